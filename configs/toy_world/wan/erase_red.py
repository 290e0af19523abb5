"""Erase the colour red from the Wan-architecture toy-world model (assets/toy_world_wan).

    unlearn-jax erase --config configs/toy_world/wan/erase_red.py

The method settings are those of configs/toy_world/erase_red.py (the CogVideoX toy's run: adapter
erasers of rank 8 in every block, eta, alpha, beta, steps, batch, learning rate, the prompt pool
and preservation prompts); only the model and the workdir differ, plus what is changed below. The
family gives the rest: x_t is sampled with the Wan family's UniPC (the folder's scheduler config),
the prompts are encoded the Wan way (masked, zero after each prompt, 512 positions) and the
adapter sits on each block's self-attention output. Then every toy concept is generated with the
base and the erased model (same prompts, same noise) and the before/after table is printed (also
<workdir>/eval.json).
"""
from pathlib import Path

from unlearn_jax.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def get_config():
    c = load_config(ROOT / "configs" / "toy_world" / "erase_red.py")
    c.workdir = "runs/toy_world/wan/erase_red"
    c.model.path = str(ROOT / "assets" / "toy_world_wan")
    return c
