"""Toy-world ablation: full fine-tuning of the transformer (ESD-style) instead of an eraser.

    unlearn-jax erase --config configs/toy_world/ablations/full.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config


def get_config():
    c = ablation_config(__file__)
    c.eraser.kind = "full"
    c.train.learning_rate = 3e-4  # the best of 1e-3 / 3e-4 / 1e-4 (README)
    return c
