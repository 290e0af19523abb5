"""Toy-world ablation: LoRA on the attention projections instead of the adapter eraser.

    unlearn-jax erase --config configs/toy_world/ablations/lora.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config


def get_config():
    c = ablation_config(__file__)
    c.eraser.kind = "lora"
    c.train.learning_rate = 1e-3  # the best of 3e-3 / 1e-3 / 3e-4 (README)
    return c
