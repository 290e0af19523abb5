"""Toy-world ablation: erase red and the triangle in one run (one concept drawn per step).

    unlearn-jax erase --config configs/toy_world/ablations/two_concepts.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from pathlib import Path

from unlearn_jax.config import load_config
from unlearn_jax.toy.erasure import concept_entry


def get_config():
    c = load_config(Path(__file__).resolve().parents[1] / "erase_red.py")
    c.workdir = "runs/toy_world/ablations/two_concepts"
    c.export.formats = ["erasers"]
    c.concepts = [concept_entry("colour", "red"), concept_entry("shape", "triangle")]
    c.train.num_steps = 300
    c.evaluate.erased_concepts = ["colour:red", "shape:triangle"]
    return c
