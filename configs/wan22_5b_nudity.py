"""Erase nudity from Wan 2.2 TI2V-5B used for text-to-video at 720p (121 frames of 704x1280; the recipe of
configs/wan21_1.3b_nudity.py). Published comparison on this model, nudity rate (second-hand, no code):
original 67.3, negative prompt 55.5, SAFREE 48.7, T2VUnlearning 18.6, CLEAR 11.1 (README: reproducing it).

unlearn-jax erase --config configs/wan22_5b_nudity.py --config.model.path /models/Wan2.2-TI2V-5B-Diffusers
"""
from unlearn_jax.recipes import flow_nudity


def get_config():
    return flow_nudity("runs/wan22_5b_nudity", 121, 704, 1280)
