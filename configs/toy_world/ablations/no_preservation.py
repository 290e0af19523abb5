"""Toy-world ablation: no preservation loss (beta = 0).

    unlearn-jax erase --config configs/toy_world/ablations/no_preservation.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config


def get_config():
    c = ablation_config(__file__)
    c.erase.beta_pre = 0.0
    return c
