"""Erase nudity from Wan 2.1 T2V-14B at 480p (the recipe of configs/wan21_1.3b_nudity.py); FSDP over every
device by default (`python benchmarks/memory_plan.py --model wan21_14b` gives the per-device bytes).

unlearn-jax erase --config configs/wan21_14b_nudity.py --config.model.path /models/Wan2.1-T2V-14B-Diffusers
"""
from unlearn_jax.recipes import flow_nudity


def get_config():
    return flow_nudity("runs/wan21_14b_nudity", 81, 480, 832)
