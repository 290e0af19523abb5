"""The toy world's first recipe: erase red in a fixed 150 steps, no in-run check (tuned on red alone).

    unlearn-jax erase --config configs/toy_world/fixed_steps.py

Kept because the README's ablation table, the ESD-style baseline and the adversarial run were
measured from it (configs/toy_world/ablations/, baselines/esd_red.py, erase_red_robust.py). It
erases red and green, but not every concept: a shape's videos flood (README, "One recipe for every
concept"); configs/toy_world/erase.py is the recipe that holds for all eleven.
"""
from pathlib import Path

from unlearn_jax.erase_config import default_config
from unlearn_jax.toy.erasure import concept_entry

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = default_config()
    c.workdir = "runs/toy_world/fixed_steps"
    c.model.path = str(ROOT / "assets" / "toy_world")
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention = "xla"
    c.video.num_frames = 5  # the toy model is pixel-space: 5 frames of 20 x 20
    c.video.height = 20
    c.video.width = 20
    c.concepts = [concept_entry("colour", "red")]
    c.sampler.num_steps = 25
    c.sampler.guidance_scale = 6.0
    c.erase.eta = 3.0
    c.erase.beta_pre = 10.0  # the toy's concepts share every pixel: hold the other colours firmly
    c.eraser.rank = 8
    c.train.num_steps = 150
    c.train.batch_size = 4
    c.train.learning_rate = 1e-2
    c.train.checkpoint_every = 50
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    c.export.formats = ["erasers", "t2vunlearning"]
    c.evaluate.toy_world = True
    c.evaluate.erased_concepts = ["colour:red"]
    return c
