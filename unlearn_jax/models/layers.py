"""Small NNX building blocks shared by the model families: annotated dense and norm layers, attention,
the runtime options, the sinusoidal timestep features, remat policies and the jitted forward."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def _init(init, axes: Axes):
    return nnx.with_partitioning(init, axes)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) with logical axis names; computes in `dtype`."""

    def __init__(self, din: int, dout: int, axes: Axes, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(nnx.initializers.lecun_normal(), axes)(rngs.params(), (din, dout), param_dtype))
        self.bias = (nnx.Param(_init(nnx.initializers.zeros_init(), (axes[1],))(rngs.params(), (dout,), param_dtype))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, always computed in fp32 (two-pass variance, as PyTorch)."""

    def __init__(self, dim: int, eps: float, *, affine: bool = True, axis_name: str = "norm",
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        if affine:
            self.scale = nnx.Param(_init(nnx.initializers.ones_init(), (axis_name,))(rngs.params(), (dim,), param_dtype))
            self.bias = nnx.Param(_init(nnx.initializers.zeros_init(), (axis_name,))(rngs.params(), (dim,), param_dtype))
        else:
            self.scale = self.bias = None

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


ATTENTION_IMPLS = ("reference", "chunked", "xla", "cudnn", "auto")
ATTENTION_CHUNK = 1024  # default query block of the "chunked" path


def _reference_attention(q, k, v, key_mask=None):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        # the most negative finite logit (as jax.nn.dot_product_attention masks): a masked key gets
        # exactly zero weight, and a row without any key stays finite
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def _chunked_attention(q, k, v, chunk: int, key_mask=None):
    """The reference path over query blocks of `chunk` (the last one zero-padded), one block at a time.

    Each block is the reference computation on its own rows, so the result equals the reference to
    rounding; only one (B, N, chunk, S) logits block is live. Each block is rematerialised in the
    backward pass, so the gradient does not keep every block's probabilities either."""
    b, t, n, h = q.shape
    chunk = max(1, min(int(chunk), t))
    pad = (-t) % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    qc = qp.reshape(b, -1, chunk, n, h).swapaxes(0, 1)  # (C, B, chunk, N, H)
    block = jax.checkpoint(lambda qq: _reference_attention(qq, k, v, key_mask), prevent_cse=False)
    out = jax.lax.map(block, qc)  # (C, B, chunk, N, H)
    return out.swapaxes(0, 1).reshape(b, -1, n, v.shape[-1])[:, :t]


def attention(q, k, v, impl: str = "xla", chunk: int | None = None, key_mask=None):
    """Softmax attention over (B, T, N, H) arrays; `impl` picks the kernel.

    key_mask: optional (B, S) bool, the keys every query attends to (None: all of them).

    "reference" is the plain einsum-softmax path (fp32 softmax); "chunked" is the same computation
    over query blocks of `chunk` rows (default ATTENTION_CHUNK), a memory-bounded pure-XLA path for
    backends without a fused kernel; the others go through `jax.nn.dot_product_attention` ("auto"
    lets JAX choose the backend, except on the CPU, where the einsum path is used: its backward is
    about twice as fast there, benchmarks/erase_iteration.py).
    """
    if impl == "auto" and jax.default_backend() == "cpu":
        impl = "reference"
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, bool)
    if impl == "reference":
        return _reference_attention(q, k, v, key_mask)
    if impl == "chunked":
        return _chunked_attention(q, k, v, ATTENTION_CHUNK if chunk is None else chunk, key_mask)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
    mask = None
    if key_mask is not None:
        # (B, 1, 1, S): every head and query; cuDNN takes the mask as a bias of the full (T, S) extent
        mask = key_mask[:, None, None, :]
        if impl == "cudnn":
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "auto" else impl)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def remat(fn, policy: str):
    """Wraps a scan body in `jax.checkpoint` under a named policy ("none" leaves it as is)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def logical_constraint(x, axes: Sequence[str | None], mesh, rules):
    """Sharding constraint on an activation by logical axis names; a no-op without a mesh."""
    if mesh is None:
        return x
    from unlearn_jax.parallel import logical_to_spec

    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, logical_to_spec(axes, rules)))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs (not part of the checkpoint): precision, kernels, memory policy, sharding."""

    dtype: Any = jnp.float32  # compute dtype; norms, modulation and softmax stay fp32
    param_dtype: Any = jnp.float32
    attention: str = "xla"  # one of ATTENTION_IMPLS
    attention_chunk: int | None = None  # query block of attention="chunked" (None: layers.ATTENTION_CHUNK)
    remat: str = "none"  # one of layers.REMAT_POLICIES
    scan_unroll: int = 1
    mesh: Any = None  # activation sharding constraints when set
    rules: tuple = ()


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, shift: float, max_period: float = 10000.0):
    """Sinusoidal timestep features (B,) -> (B, dim) in fp32, diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@jax.jit
def jitted_forward(graphdef, state, x, cond, t):
    """A model's velocity, `model.forward(x, cond, t)[0]`, with the weights as an argument (one compile per shapes)."""
    return nnx.merge(graphdef, state).forward(x, cond, t)[0]
