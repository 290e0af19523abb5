"""Toy-world ablation: no localization loss (alpha = 0).

    unlearn-jax erase --config configs/toy_world/ablations/no_localization.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config


def get_config():
    c = ablation_config(__file__)
    c.erase.alpha_loc = 0.0
    return c
