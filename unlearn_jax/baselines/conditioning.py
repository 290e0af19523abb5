"""A prompt conditioning that changes during sampling, for the inference-time baselines.

SAFREE conditions the first steps of a sampling run on filtered prompt embeddings and the rest on
the original ones, with a window of its own for each prompt. The sampler (`sampling.sample`) knows
nothing of this: the conditioning it carries is the pytree {"early", "late", "until"}, and the
velocity function picks, per row, "early" while the step's timestep is above the row's `until`
and "late" after. A schedule's timesteps fall strictly, so "the first k steps" is "timestep above
timesteps[k]" (-inf: every step).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Conditioning(NamedTuple):
    """What a method feeds the sampler for N prompts."""

    context: Any                     # (N, ...): the prompts' conditioning (a method's filtered one)
    uncond: Any                      # (1, ...): the unconditional branch (a negative prompt's)
    late: Any = None                 # (N, ...): the conditioning after each prompt's window; None: none
    steps: np.ndarray | None = None  # (N,) int: how many first steps use `context` (the rest `late`)


def thresholds(timesteps, steps) -> np.ndarray:
    """(N,) float32: the timestep each row's window ends at; a step at timestep t is in the window
    when t > threshold. steps >= len(timesteps): -inf (every step)."""
    ts = np.asarray(timesteps, np.float64)
    steps = np.asarray(steps, np.int64)
    if (steps < 0).any():
        raise ValueError(f"window steps must be >= 0; got {steps.min()}")
    if len(ts) > 1 and not (np.diff(ts) < 0).all():
        raise ValueError("the schedule's timesteps do not fall strictly: a window cannot be told by timestep")
    out = np.where(steps < len(ts), ts[np.minimum(steps, len(ts) - 1)], -np.inf)
    return out.astype(np.float32)


def windowed(early, late, until):
    """The sampler's conditioning pytree of a windowed conditioning (every leaf batch-first)."""
    return {"early": early, "late": late, "until": np.asarray(until, np.float32)}


def windowed_uncond(uncond):
    """The unconditional branch in the same pytree: the same conditioning on both sides of the window."""
    n = jax.tree.leaves(uncond)[0].shape[0]
    return windowed(uncond, uncond, np.full((n,), -np.inf, np.float32))


def windowed_velocity(velocity_fn):
    """`velocity_fn(x, t, c)` over a `windowed` conditioning: row b sees c["early"][b] while
    t[b] > c["until"][b], else c["late"][b]."""
    def fn(x, t, c):
        early = jnp.asarray(t).astype(jnp.float32) > c["until"]

        def pick(e, l):
            sel = early.reshape(early.shape + (1,) * (jnp.ndim(e) - 1))
            return jnp.where(sel, e, l)

        return velocity_fn(x, t, jax.tree.map(pick, c["early"], c["late"]))

    return fn


__all__ = ["Conditioning", "thresholds", "windowed", "windowed_uncond", "windowed_velocity"]
