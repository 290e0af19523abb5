"""Toy-world ablation: LoRA on the attention projections instead of the adapter eraser.

    unlearn-jax erase --config configs/toy_world/ablations/lora.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/lora"
    c.export.formats = ["erasers"]
    c.eraser.kind = "lora"
    c.train.learning_rate = 3e-3
    return c
