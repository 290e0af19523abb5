"""Erase nudity from HunyuanVideo (13B, guidance-distilled) at 61 frames of 544x960: the published
settings (η 3, α 5, 500 steps, lr 1e-4, rank-128 adapters in the 40 single-stream blocks), x_t from the
pipeline's flow-matching Euler (shift 7 from its scheduler config, its own sigmas) run j of 50 steps at the
pipeline's embedded guidance 6 (every pass of the step sees the same guidance embedding).

unlearn-jax erase --config configs/hunyuan_video_nudity.py --config.model.path /models/HunyuanVideo
"""
from unlearn_jax.recipes import flow_nudity


def get_config():
    c = flow_nudity("runs/hunyuan_video_nudity", 61, 544, 960, sampler="flow_euler")
    c.sampler.guidance_scale = 6.0  # the embedded guidance of HunyuanVideoPipeline's default
    return c
