"""Toy-world ablation: x_t drawn from a bank of frozen-model trajectories instead of sampled by the erased model.

    unlearn-jax erase --config configs/toy_world/ablations/frozen_bank.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config


def get_config():
    c = ablation_config(__file__)
    c.sampler.xt_source = "frozen_bank"
    return c
