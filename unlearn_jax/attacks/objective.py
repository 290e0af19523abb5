"""The attack objective shared by the `soft` and `tokens` attacks, over the family interface.

UnlearnDiffAtk's objective in velocity space: points (x_t, t) on the ORIGINAL model's own trajectories
for the concept's prompt (the pipeline's sampler with its guidance, stopped at a random step j of J), the
original model's conditional velocity there as the target, and

    loss(c) = mean_i || v_erased(x_t_i, t_i, c) - v_original(x_t_i, t_i, c_concept) ||^2

over a conditioning `c` the attacker controls (the prompt's embeddings, or the tokens that make them).
A conditioning that reaches the target makes the erased model denoise toward what the original model
draws for the concept: the concept is still reachable in the weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.families.base import leading_size
from unlearn_jax.sampling import sample


@dataclasses.dataclass
class Targets:
    """M points of the original model's trajectories: latents (M, ...), timesteps (M,), target velocities."""

    x: Any
    t: Any
    v: Any

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


def _repeat(cond, n: int):
    """A batch-1 conditioning repeated to n rows."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape[1:])), cond)


class Velocities:
    """The original and the erased model as pure functions of (x, t, cond), with the family's guidance."""

    def __init__(self, erased, family, guidance_scale: float, dtype=None):
        """dtype: the compute dtype the latents and the conditioning's floating leaves are cast to (a bf16
        model's); None keeps them as given."""
        self.family, self.g, self.dtype = family, guidance_scale, dtype
        self.graphdef, self.state = nnx.split(erased)

    def velocity(self, x, t, cond, erasers_on: bool):
        model = nnx.merge(self.graphdef, self.state)
        cond = self.family.with_guidance(cond, self.g)
        if self.dtype is not None:
            x = x.astype(self.dtype)
            cond = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, cond)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        return model.forward(x, cond, t, erasers_on=erasers_on)[0].astype(jnp.float32)


def make_targets(vel: Velocities, schedule, latent_shape, concept_cond, uncond, *, n: int, seed: int,
                 cfg_scale: float, use_dynamic_cfg: bool = False, guidance_scale_2: float | None = None,
                 boundary: float | None = None) -> Targets:
    """n points on the original model's trajectories for the concept's conditioning (batch 1 or n rows):
    noise i and step j_i ~ U{0..J-1} from `seed`; the sampler runs j_i guided steps (the original model:
    erasers off) with the pipeline's guidance (`cfg_scale`, its dynamic ramp, a two-stage model's second
    scale below `boundary`); the target is the original's conditional velocity there."""
    rng = np.random.default_rng(seed)
    J = schedule.num_steps
    js = rng.integers(0, J, size=n)
    cond = concept_cond if leading_size(concept_cond) == n else _repeat(concept_cond, n)
    key = jax.random.key(seed)
    noise = jax.random.normal(key, (n, *latent_shape), jnp.float32)

    @jax.jit
    def one(noise_i, cond_i, j):
        def v(x, t, c):
            return vel.velocity(x, t, c, erasers_on=False)

        out = sample(v, schedule, noise_i[None], cond_i, uncond, num_steps=J, guidance_scale=cfg_scale,
                     stop_after=j, key=jax.random.fold_in(key, 1), use_dynamic_cfg=use_dynamic_cfg,
                     guidance_scale_2=guidance_scale_2, boundary=boundary)
        x = out.latents
        return x[0], out.timestep, vel.velocity(x, out.timestep, cond_i, erasers_on=False)[0]

    xs, ts, vs = [], [], []
    for i in range(n):
        cond_i = jax.tree.map(lambda a: a[i:i + 1], cond)
        x, t, v = one(noise[i], cond_i, jnp.int32(js[i]))
        xs.append(x), ts.append(jnp.reshape(t, ())), vs.append(v)
    return Targets(jnp.stack(xs), jnp.stack(ts).astype(jnp.float32), jnp.stack(vs))


def attack_loss(vel: Velocities, targets: Targets, cond, erasers_on: bool = True):
    """Mean squared distance of the attacked model's velocity under `cond` (batch 1: the same conditioning at
    every target point) to the targets."""
    c = _repeat(cond, targets.size)
    v = vel.velocity(targets.x, targets.t, c, erasers_on=erasers_on)
    return jnp.mean(jnp.square(v - targets.v))


def candidate_losses(vel: Velocities, targets: Targets, conds, erasers_on: bool = True):
    """(B,) losses of B candidate conditionings (leading axis B), each over every target point."""
    return jax.lax.map(lambda c: attack_loss(vel, targets, jax.tree.map(lambda a: a[None], c), erasers_on), conds)
