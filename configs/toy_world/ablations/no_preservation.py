"""Toy-world ablation: no preservation loss (beta = 0).

    unlearn-jax erase --config configs/toy_world/ablations/no_preservation.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/no_preservation"
    c.export.formats = ["erasers"]
    c.erase.beta_pre = 0.0
    return c
