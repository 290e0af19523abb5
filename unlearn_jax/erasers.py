"""Erasers: the trainable part of an erased model, kept apart from the frozen base weights.

An eraser is a pytree `phi` of fp32 arrays with a leading layer axis, applied through the
model's `Hooks`, so "erasers off" is just calling the model without them: no second copy of
the base weights is ever made.

kinds (ALGORITHM.md §1):
- "adapter": T2VUnlearning's adapter on the video part of each block's attention output,
  `a' = a + s * up(gelu(down(a)))` (exact GELU; `up` zero-initialised, so the erased model
  starts equal to the base model). Layout: down.kernel (L, dim, rank), down.bias (L, rank),
  up.kernel (L, rank, dim), up.bias (L, dim).
- "lora": low-rank deltas on the attention projections, `W + s * A @ B` (B zero-initialised).
  Layout: {proj: {"a": (L, in, rank), "b": (L, rank, out)}}, proj in to_q/to_k/to_v/to_out.
- "attn" / "full": fine-tuned copies of a block's attention weights / all of its weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.errors import UnlearnError
from unlearn_jax.models.cogvideox import CogVideoXTransformer, Hooks

KINDS = ("adapter", "lora", "attn", "full")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclasses.dataclass(frozen=True)
class EraserConfig:
    kind: str = "adapter"
    rank: int = 128
    scale: float = 1.0  # s: adapter output scale / LoRA scale
    lora_targets: tuple = LORA_TARGETS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnlearnError(f"eraser kind {self.kind!r}: choose one of {KINDS}")
        if self.kind in ("adapter", "lora") and self.rank < 1:
            raise UnlearnError(f"eraser rank must be >= 1, got {self.rank}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise UnlearnError(f"lora_targets {bad} unknown: choose from {LORA_TARGETS}")


def _torch_linear_uniform(key, shape, fan_in):
    """PyTorch's default nn.Linear init (kaiming-uniform a=sqrt(5) == U(+-1/sqrt(fan_in)))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _block_params(model: CogVideoXTransformer) -> dict[str, jax.Array]:
    """Flat dotted path -> stacked array of the blocks' parameters."""
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))}


def _is_attn_path(path: str) -> bool:
    return path.startswith("attn1.")


def init_erasers(cfg: EraserConfig, model: CogVideoXTransformer, key) -> dict:
    """Fresh trainable parameters (fp32) for `model`; the erased model starts equal to the base."""
    mc = model.config
    L, dim, r = mc.num_layers, mc.inner_dim, cfg.rank
    if cfg.kind == "adapter":
        k1, k2 = jax.random.split(key)
        return {"down": {"kernel": _torch_linear_uniform(k1, (L, dim, r), dim),
                         "bias": _torch_linear_uniform(k2, (L, r), dim)},
                "up": {"kernel": jnp.zeros((L, r, dim), jnp.float32), "bias": jnp.zeros((L, dim), jnp.float32)}}
    if cfg.kind == "lora":
        out = {}
        for i, name in enumerate(cfg.lora_targets):
            out[name] = {"a": _torch_linear_uniform(jax.random.fold_in(key, i), (L, dim, r), dim),
                         "b": jnp.zeros((L, r, dim), jnp.float32)}
        return out
    params = _block_params(model)
    keep = _is_attn_path if cfg.kind == "attn" else (lambda p: True)
    # A real copy: an fp32 base leaf would otherwise be the same buffer, and training donates phi.
    return {p: jnp.array(v, dtype=jnp.float32, copy=True) for p, v in params.items() if keep(p)}


def eraser_axes(cfg: EraserConfig, phi: dict, model: CogVideoXTransformer | None = None) -> dict:
    """Logical axis names of every eraser leaf (for sharding them like the model)."""
    if cfg.kind == "adapter":
        return {"down": {"kernel": ("layers", "embed", "rank"), "bias": ("layers", "rank")},
                "up": {"kernel": ("layers", "rank", "embed"), "bias": ("layers", "embed")}}
    if cfg.kind == "lora":
        return {n: {"a": ("layers", "embed", "rank"), "b": ("layers", "rank", "heads")} for n in phi}
    if model is None:
        raise ValueError("fine-tuned erasers take their axes from the model")
    axes = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
            for p, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))}
    return {p: axes[p] for p in phi}


def adapter_apply(a, layer_phi, scale):
    """The adapter's output term `up(gelu(down(a)))` (before the scale), in a's dtype."""
    dt = a.dtype
    z = jnp.dot(a, layer_phi["down"]["kernel"].astype(dt)) + layer_phi["down"]["bias"].astype(dt)
    z = jax.nn.gelu(z.astype(jnp.float32), approximate=False).astype(dt)
    return jnp.dot(z, layer_phi["up"]["kernel"].astype(dt)) + layer_phi["up"]["bias"].astype(dt)


def _replace_leaves(layer_state, new: dict[str, jax.Array]):
    flat = []
    for path, var in nnx.to_flat_state(layer_state):
        key = ".".join(map(str, path))
        flat.append((path, var.replace(new[key].astype(var[...].dtype)) if key in new else var))
    return nnx.from_flat_state(flat)


def eraser_hooks(cfg: EraserConfig, phi: dict | None, scale: float | jax.Array | None = None,
                 collect_outputs: bool | str = False) -> tuple[Hooks | None, Any]:
    """(hooks, extras) that apply `phi` inside the model; (None, None) when phi is None (erasers off).

    collect_outputs: the adapter hook returns each block's adapter output `o_l` (B, N_video, dim)
    as aux (True), or only its per-token energy mean_d(o_l^2) (B, N_video) ("energy"): all the
    localization loss needs, and the layer scan then stacks D times less.
    """
    if phi is None:
        return None, None
    s = cfg.scale if scale is None else scale
    if cfg.kind == "adapter":
        def on_video_attn(a, extra):
            o = adapter_apply(a, extra, s)
            aux = None
            if collect_outputs == "energy":
                aux = jnp.mean(jnp.square(o.astype(jnp.float32)), axis=-1)
            elif collect_outputs:
                aux = o
            return (a + jnp.asarray(s, a.dtype) * o).astype(a.dtype), aux

        return Hooks(on_video_attn=on_video_attn), phi
    if cfg.kind == "lora":
        def edit_layer(layer_state, extra):
            base = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(layer_state)}
            new = {}
            for name, ab in extra.items():
                k = f"attn1.{name}.kernel"
                new[k] = base[k].astype(jnp.float32) + s * (ab["a"] @ ab["b"])
            return _replace_leaves(layer_state, new)

        return Hooks(edit_layer=edit_layer), phi

    def edit_layer(layer_state, extra):
        return _replace_leaves(layer_state, extra)

    return Hooks(edit_layer=edit_layer), phi


def count_params(phi) -> int:
    return int(sum(x.size for x in jax.tree.leaves(phi)))


def attach_erasers(model, erasers):
    """`model` with erasers attached (an `eraser_io.ErasedTransformer`): `erasers` is an eraser folder
    (ours or the published T2VUnlearning format) or an `(EraserConfig, phi)` pair."""
    from unlearn_jax.eraser_io import attach_erasers as _attach

    return _attach(model, erasers)
