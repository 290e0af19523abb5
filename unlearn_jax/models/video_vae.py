"""What the families' video VAEs share: the posterior type, the conv weight layout of the rule tables,
the tile blending of diffusers' tiled decode / encode, and the jitted one-chunk calls."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import Transform


class LatentDistribution(NamedTuple):
    """The diagonal Gaussian posterior of `encode`, in diffusers' layout (B, C, F, h, w)."""

    mean: jax.Array
    logvar: jax.Array  # already clipped to [-30, 20] as diffusers does

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


def _conv_transform(nd: int) -> Transform:
    """torch.nn.ConvNd weight (O, I, *k) <-> JAX (*k, I, O)."""
    to_jax_axes = tuple(range(2, 2 + nd)) + (1, 0)
    to_torch_axes = (nd + 1, nd) + tuple(range(nd))
    return Transform(
        f"conv{nd}d",
        lambda a: np.ascontiguousarray(np.transpose(a, to_jax_axes)),
        lambda a: np.ascontiguousarray(np.transpose(a, to_torch_axes)),
        lambda s: tuple(s[i] for i in to_jax_axes) if len(s) == nd + 2 else ("mismatch",) + tuple(s),
        lambda s: tuple(s[i] for i in to_torch_axes),
    )


CONV3D = _conv_transform(3)
CONV2D = _conv_transform(2)


def _blend(a, b, extent: int, axis: int):
    """b's first `extent` rows along `axis` faded in from a's last ones (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    wb = np.array([y / extent for y in range(extent)], np.float32).reshape(shape)
    wa = np.array([1 - y / extent for y in range(extent)], np.float32).reshape(shape)
    n = a.shape[axis]
    a_tail = jax.lax.slice_in_dim(a, n - extent, n, axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = (a_tail * wa.astype(a.dtype) + b_head * wb.astype(b.dtype)).astype(b.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


@functools.partial(jax.jit, static_argnums=0)
def _decode_chunk_jit(graphdef, state, z, cache):
    return nnx.merge(graphdef, state).decode_chunk(z, cache)


@functools.partial(jax.jit, static_argnums=0)
def _encode_chunk_jit(graphdef, state, x, cache):
    return nnx.merge(graphdef, state).encode_chunk(x, cache)
