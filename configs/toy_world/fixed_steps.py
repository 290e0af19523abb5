"""The toy world's first recipe: erase red in a fixed 150 steps, no in-run check (tuned on red alone).

    unlearn-jax erase --config configs/toy_world/fixed_steps.py

Kept because the README's ablation table, the ESD-style baseline and the adversarial run were
measured from it (configs/toy_world/ablations/, baselines/esd_red.py, erase_red_robust.py). It
erases red and green, but not every concept: a shape's videos flood (README, "One recipe for every
concept"); configs/toy_world/erase.py is the recipe that holds for all eleven.
"""
from pathlib import Path

from unlearn_jax.config import load_config
from unlearn_jax.toy.erasure import concept_entry


def get_config():
    c = load_config(f"{Path(__file__).with_name('erase.py')}:colour:red")
    c.workdir = "runs/toy_world/fixed_steps"
    c.concepts = [concept_entry("colour", "red")]  # 48 captions naming red with train synonyms
    c.check.every = 0  # no in-run check: the fixed 150 steps
    c.train.num_steps = 150
    c.train.checkpoint_every = 50
    return c
