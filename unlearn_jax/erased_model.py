"""The erased model: a base transformer of any family with erasers attached, called like the base model."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.erasers import EraserConfig, check_phi, eraser_axes, eraser_hooks, merge_erasers
from unlearn_jax.errors import UnlearnError


class EraserParam(nnx.Param):
    """Trainable eraser weights (select them with `nnx.state(model, EraserParam)`)."""


class ErasedTransformer(nnx.Module):
    """A base transformer with erasers attached; called like the base model.

    `model(x, cond, t)` is the erased velocity (the base model's diffusers-style call with the same
    arguments); `erasers_on=False` gives the base model's, `scale` overrides the eraser scale
    (0 = off). The base weights are shared, never copied.
    """

    def __init__(self, base, eraser_config: EraserConfig, phi: Mapping):
        if isinstance(base, ErasedTransformer):
            base = base.base
        check_phi(eraser_config, phi, base, "attach_erasers")
        mesh = base.runtime.mesh
        if mesh is not None:  # shard the erasers like the weights they act on
            from unlearn_jax.parallel import named_sharding

            axes = eraser_axes(eraser_config, phi, base)
            phi = jax.tree.map(lambda a, ax: jax.device_put(a, named_sharding(ax, a.shape, mesh, base.runtime.rules)),
                               dict(phi), axes)
        self.base = base
        self.eraser_config = eraser_config
        self.phi = nnx.data(jax.tree.map(lambda a: EraserParam(jnp.asarray(a)), dict(phi)))

    @property
    def config(self):
        return self.base.config

    @property
    def runtime(self):
        return self.base.runtime

    def token_grid(self, *args):
        return self.base.token_grid(*args)

    def eraser_params(self) -> dict:
        """phi as a plain pytree of arrays."""
        return jax.tree.map(lambda v: v[...], self.phi, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def forward(self, hidden_states, cond, timestep, erasers_on: bool = True, scale=None,
                collect_outputs: bool = False):
        """(velocity, aux) like the base model's `forward`, with the erasers applied."""
        phi = self.eraser_params() if erasers_on else None
        hooks, extras = eraser_hooks(self.eraser_config, phi, scale, collect_outputs)
        return self.base.forward(hidden_states, cond, timestep, hooks, extras)

    def __call__(self, *args, erasers_on: bool = True, scale=None, **kwargs):
        """The base model's diffusers-style call (jitted), with the erasers applied."""
        x, cond, t = self.base.forward_inputs(*args, **kwargs)
        graphdef, state = nnx.split(self)
        s = jnp.asarray(self.eraser_config.scale if scale is None else scale, jnp.float32)
        return _erased_forward(graphdef, state, x, cond, t, s, bool(erasers_on))

    def merged(self):
        """The base model with the erasers folded into its weights (lora / attn / full kinds)."""
        return merge_erasers(self.base, self.eraser_config, self.eraser_params())

    def save_erasers(self, folder) -> Path:
        from unlearn_jax.eraser_io import save_erasers

        return save_erasers(folder, self.eraser_config, self.eraser_params(), self.base.config)


@functools.partial(jax.jit, static_argnames=("erasers_on",))
def _erased_forward(graphdef, state, x, cond, t, scale, erasers_on):
    return nnx.merge(graphdef, state).forward(x, cond, t, erasers_on=erasers_on, scale=scale)[0]


def attach_erasers(model, erasers) -> ErasedTransformer:
    """`model` with erasers attached: `erasers` is an eraser folder (ours or the published format) or
    a `(EraserConfig, phi)` pair. Checks every tensor against the model."""
    from unlearn_jax.eraser_io import load_erasers

    base = model.base if isinstance(model, ErasedTransformer) else model
    if isinstance(erasers, (str, os.PathLike)):
        cfg, phi = load_erasers(erasers, base)
    elif isinstance(erasers, tuple) and len(erasers) == 2 and isinstance(erasers[0], EraserConfig):
        cfg, phi = erasers
    else:
        raise UnlearnError(f"erasers={erasers!r}: give an eraser folder or an (EraserConfig, phi) pair")
    return ErasedTransformer(base, cfg, phi)


__all__ = ["ErasedTransformer", "EraserParam", "attach_erasers"]
