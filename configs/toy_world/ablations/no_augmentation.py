"""Toy-world ablation: erase red with the bare phrase only (no paraphrase pool; train synonyms still mark its tokens).

    unlearn-jax erase --config configs/toy_world/ablations/no_augmentation.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config
from unlearn_jax.toy.erasure import concept_entry


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/no_augmentation"
    c.export.formats = ["erasers"]
    c.concepts = [concept_entry("colour", "red", augment=False)]
    return c
