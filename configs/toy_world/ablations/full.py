"""Toy-world ablation: full fine-tuning of the transformer (ESD-style) instead of an eraser.

    unlearn-jax erase --config configs/toy_world/ablations/full.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/full"
    c.export.formats = ["erasers"]
    c.eraser.kind = "full"
    c.train.learning_rate = 1e-4
    return c
