"""The ESD-style baseline on the toy world: erase red by fine-tuning the attention weights.

    unlearn-jax erase --config configs/toy_world/baselines/esd_red.py

ESD (Gandikota et al. 2023) in this framework: the same negatively guided target as the method
(eta as in configs/toy_world/fixed_steps.py), trained on the bare concept prompt ("red"), with no
localization loss (alpha 0), no preservation loss (beta 0), and no eraser module: the attention
weights of every block are fine-tuned (`eraser.kind = "attn"`, the counterpart of ESD-x's
cross-attention in a joint-attention transformer). Everything else (sampler, x_t from the model
being trained, steps, batch) is fixed_steps.py's; the evaluation that follows is the same.
(The comparison of every method: python tools/toy/compare_methods.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config
from unlearn_jax.toy.erasure import concept_entry

ROOT = Path(__file__).resolve().parents[3]


def get_config():
    c = load_config(ROOT / "configs" / "toy_world" / "fixed_steps.py")
    c.workdir = "runs/toy_world/baselines/esd_red"
    c.concepts = [concept_entry("colour", "red", augment=False)]
    c.erase.alpha_loc = 0.0
    c.erase.beta_pre = 0.0
    c.eraser.kind = "attn"
    c.train.learning_rate = 3e-4
    c.export.formats = ["erasers"]
    return c
