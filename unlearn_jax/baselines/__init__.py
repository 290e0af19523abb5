"""The published comparisons, run in this framework with the same protocol as the method.

- `conditioning`: a prompt conditioning that changes during sampling (what inference-time methods feed
  the sampler).
- `safree`: SAFREE-style training-free filtering of the text conditioning.
The negative-prompt baseline needs no module (the concept's words in the unconditional branch), and
the ESD-style eraser is a training config of this project's trainer
(`configs/toy_world/baselines/esd_red.py`: the same negatively guided target, no localization, no
preservation, the attention weights fine-tuned).
"""

INFERENCE_METHODS = ("negative-prompt", "safree")  # `unlearn-jax eval --method`, besides "erasers"
