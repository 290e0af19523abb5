"""Erase the colour red from the bundled toy-world model (assets/toy_world): the README's main job.

    unlearn-jax erase --config configs/toy_world/erase_red.py

configs/toy_world/erase.py's recipe for colour:red (the same as `--config configs/toy_world/erase.py:colour:red`,
in its own workdir): training stops when the in-run check finds red gone with the other concepts
intact, the erasers are exported, then every toy concept is generated with the base and the erased
model (same prompts, same noise) and the before/after table is printed (also <workdir>/eval.json).
Train synonyms only: the held-out ones ("ruby") test robustness to paraphrase.
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(f"{Path(__file__).with_name('erase.py')}:colour:red")
    c.workdir = "runs/toy_world/erase_red"
    return c
