"""Erase the colour red from the bundled toy-world model (assets/toy_world): the README's main job.

    unlearn-jax erase --config configs/toy_world/erase_red.py

Runs on 2 CPU cores in a few minutes, exports the erasers, then generates every toy concept
with the base and the erased model (same prompts, same noise) and prints the before/after
table (also <workdir>/eval.json). Train synonyms only: the held-out ones ("ruby") test
robustness to paraphrase.
"""
from pathlib import Path

from unlearn_jax.erase_config import default_config
from unlearn_jax.toy.erasure import concept_entry

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = default_config()
    c.workdir = "runs/toy_world/erase_red"
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
