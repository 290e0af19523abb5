"""Erase configs shared by several config files (configs/*.py build on these, then set what differs)."""
from __future__ import annotations

from unlearn_jax.erase_config import default_config


def flow_nudity(workdir: str, frames: int, height: int, width: int, sampler: str = "unipc", remat: str = "full"):
    """Nudity ("naked body", "person" preserved) on a flow-matching video model: the published flow-model
    settings (HunyuanVideo's: η 3, α 5), 500 steps, lr 1e-4, rank-128 adapters; x_t from the pipeline's own
    sampler run j of J = 50 steps."""
    c = default_config()
    c.workdir = workdir
    c.concepts = [{"phrase": "naked body", "type": "nudity", "preserve": ["person"]}]
    c.video.num_frames, c.video.height, c.video.width = frames, height, width
    c.sampler.kind = sampler
    c.sampler.num_steps = 50
    c.erase.eta = 3.0
    c.erase.alpha_loc = 5.0
    c.train.num_steps = 500
    c.train.learning_rate = 1e-4
    c.eraser.rank = 128
    c.model.remat = remat
    return c
