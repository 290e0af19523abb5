"""Erase nudity from Wan 2.1 T2V-1.3B at 480p (81 frames of 480x832): "naked body", the published
flow-model settings (η 3, α 5; no Wan values are published), 500 steps, lr 1e-4, rank-128 adapters on
every block's self-attention output, x_t from UniPC.

unlearn-jax erase --config configs/wan21_1.3b_nudity.py --config.model.path /models/Wan2.1-T2V-1.3B-Diffusers
"""
from unlearn_jax.recipes import flow_nudity


def get_config():
    return flow_nudity("runs/wan21_1.3b_nudity", 81, 480, 832)
