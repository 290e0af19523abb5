"""Erase any one toy-world concept with one recipe: only the concept is named.

    unlearn-jax erase --config configs/toy_world/erase.py:shape:triangle   (default: colour:red)

The recipe: adapter erasers of rank 8 in all 4 blocks, eta 3, alpha 1, beta 10, batch 4, lr 1e-2,
x_t sampled by the erased model as it trains (the method's; a bank of frozen-model trajectories is
9x faster and erased colours and shapes, but not a motion); the prompt pool is the concept's own word (the
first train synonym; its other train synonyms count as the concept's tokens); preservation prompts
name the attribute's other values. Training does not run a fixed number of steps: every 10 steps
the in-run check (config.check, unlearn_jax/toy/run_check.py) generates 32 videos of the concept
and 8 of every other concept with the current erasers and stops the run when two checks in a row
find the concept gone with the rest intact; if the rest is harmed, or the concept's own videos
break, it goes back to the last state that passed at half the learning rate. train.num_steps (300) is only the budget. Then every toy concept is generated with
the base and the erased model (n = 64 per concept and synonym split, same prompts, same noise) and
the before/after table is printed (also <workdir>/eval.json, with the check's outcome).

Why the bare word and not captions: the method's target steers away from the *whole* prompt, and
a caption names the object's colour, shape and motion; in a world where every concept covers the
same pixels the localization mask cannot keep the caption's other attributes apart, and erasing a
shape from captions floods the frame (README).
"""
from pathlib import Path

from unlearn_jax.erase_config import default_config
from unlearn_jax.toy.erasure import concept_entry
from unlearn_jax.toy.evaluate import check_concept_names

ROOT = Path(__file__).resolve().parents[2]


def get_config(concept: str = "colour:red"):
    check_concept_names([concept], f"{Path(__file__).name}:{concept}")
    attribute, value = concept.split(":", 1)
    c = default_config()
    c.workdir = f"runs/toy_world/erase/{attribute}_{value}"
    c.model.path = str(ROOT / "assets" / "toy_world")
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention = "xla"
    c.video.num_frames = 5  # the toy model is pixel-space: 5 frames of 20 x 20
    c.video.height = 20
    c.video.width = 20
    c.concepts = [concept_entry(attribute, value, augment=False)]
    c.sampler.num_steps = 25
    c.sampler.guidance_scale = 6.0
    c.erase.eta = 3.0
    c.erase.beta_pre = 10.0  # the toy's concepts share every pixel: hold the other values firmly
    c.eraser.rank = 8
    c.train.num_steps = 300
    c.train.batch_size = 4
    c.train.learning_rate = 1e-2
    c.check.every = 10
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    c.export.formats = ["erasers", "t2vunlearning"]
    c.evaluate.toy_world = True
    c.evaluate.erased_concepts = [concept]
    return c
