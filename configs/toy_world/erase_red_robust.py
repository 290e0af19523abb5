"""Erase red from the toy-world model with adversarial erasure (config.robust): configs/toy_world/fixed_steps.py
plus, every 2nd step, an inner soft attack of 5 Adam steps on the step's prompt embeddings whose result the
step also trains on. Its attack success next to the plain erasure's: README, Robustness.

    unlearn-jax erase --config configs/toy_world/erase_red_robust.py
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("fixed_steps.py"))
    c.workdir = "runs/toy_world/erase_red_robust"
    c.robust.every = 2
    c.robust.steps = 5
    c.robust.learning_rate = 0.05
    c.robust.weight = 1.0
    return c
