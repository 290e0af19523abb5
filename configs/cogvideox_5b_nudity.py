"""Erase nudity from CogVideoX-5B with the published values: "naked body", η 7, α 1, 500 steps, lr 1e-4, rank 128.

unlearn-jax erase --config configs/cogvideox_5b_nudity.py --config.model.path /path/to/CogVideoX-5b
"""
from unlearn_jax.erase_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/cogvideox_5b_nudity"
    c.concepts = [{"phrase": "naked body", "type": "nudity", "preserve": ["person"]}]
    c.erase.eta = 7.0
    c.erase.alpha_loc = 1.0
    c.train.num_steps = 500
    c.train.learning_rate = 1e-4
    c.eraser.rank = 128
    c.model.remat = "full"  # 49 frames at 480x720 on one 80 GB device
    return c
