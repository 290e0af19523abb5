"""Erase nudity from the two-expert Wan 2.2 T2V-A14B at 480p (the recipe of configs/wan21_1.3b_nudity.py).
Both experts get adapters: a step trains the expert that serves its timestep (the high-noise expert at
t >= boundary_ratio * 1000, the low-noise one below); x_t comes from the pipeline's own two-stage sampling,
guidance 4 on the high-noise steps and 3 on the low-noise ones (the values of diffusers' A14B example).
FSDP over every device by default (`python benchmarks/memory_plan.py --model wan22_a14b` gives the
per-device bytes).

unlearn-jax erase --config configs/wan22_a14b_nudity.py --config.model.path /models/Wan2.2-T2V-A14B-Diffusers
"""
from unlearn_jax.recipes import flow_nudity


def get_config():
    c = flow_nudity("runs/wan22_a14b_nudity", 81, 480, 832)
    c.sampler.guidance_scale = 4.0
    c.sampler.guidance_scale_2 = 3.0
    return c
