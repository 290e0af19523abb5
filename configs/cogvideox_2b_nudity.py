"""Erase nudity from CogVideoX-2B (published 5B values; docs/METHOD.md §2: "CogVideoX-2B: same as 5B").

unlearn-jax erase --config configs/cogvideox_2b_nudity.py --config.model.path /path/to/CogVideoX-2b
"""
from unlearn_jax.erase_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/cogvideox_2b_nudity"
    c.concepts = [{"phrase": "naked body", "type": "nudity", "preserve": ["person"]}]
    c.erase.eta = 7.0
    c.erase.alpha_loc = 1.0
    c.train.num_steps = 500
    c.train.learning_rate = 1e-4
    c.eraser.rank = 128
    c.sampler.kind = "ddim"  # 2B samples with DDIM
    return c
