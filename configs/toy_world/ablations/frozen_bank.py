"""Toy-world ablation: x_t drawn from a bank of frozen-model trajectories instead of sampled by the erased model.

    unlearn-jax erase --config configs/toy_world/ablations/frozen_bank.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/frozen_bank"
    c.export.formats = ["erasers"]
    c.sampler.xt_source = "frozen_bank"
    return c
