"""Erasers: the trainable part of an erased model, kept apart from the frozen base weights.

An eraser is a pytree `phi` of fp32 arrays with a leading layer axis, applied through the
model's `Hooks` (`models.hooks`) in the block stack the model family's `EraserSite` names, so
"erasers off" is just calling the model without them: no second copy of the base weights is
ever made.

kinds (docs/METHOD.md §1):
- "adapter": T2VUnlearning's adapter on the video part of each block's attention output,
  `a' = a + s * up(gelu(down(a)))` (exact GELU; `up` zero-initialised, so the erased model
  starts equal to the base model). Layout: down.kernel (L, dim, rank), down.bias (L, rank),
  up.kernel (L, rank, dim), up.bias (L, dim).
- "lora": low-rank deltas on the site attention's projections, `W + s * A @ B` (B
  zero-initialised). Layout: {proj: {"a": (L, in, rank), "b": (L, rank, out)}}, proj in
  to_q/to_k/to_v/to_out.
- "attn" / "full": fine-tuned copies of a block's attention weights / all of its weights.

A model of several experts (Wan 2.2 A14B, `model.experts()`) has one stack of rows over all of
them, in the experts' order (the high-noise expert's num_layers rows, then the low-noise one's);
its site takes adapter and lora erasers only (`EraserSite.kinds`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import EraserSite
from unlearn_jax.models.hooks import Hooks

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


def site_of(model) -> EraserSite:
    """The eraser site of a (possibly abstract or erased) model, from its family."""
    from unlearn_jax import families

    return families.of_model(model).eraser_site(model.config)


def check_kind(kind: str, site: EraserSite, what: str = "eraser kind"):
    """Refuses (one line) an eraser kind the model's site does not take."""
    if kind not in site.kinds:
        why = site.kinds_reason or f"this model takes {' or '.join(site.kinds)} erasers"
        raise UnlearnError(f"{what} {kind!r}: {why}")


def expert_rows(model) -> list[tuple[str, Any, slice]] | None:
    """(component name, expert, its rows of phi) of a model (or model config) made of several experts, in
    row order; None for one transformer. The expert is a model, or a config where `model` is one."""
    model = getattr(model, "base", model)
    if not hasattr(model, "experts"):
        return None
    out, start = [], 0
    for name, part in model.experts().items():
        n = model_and_site(part)[1].num_layers
        out.append((name, part, slice(start, start + n)))
        start += n
    return out


def take_layers(phi, rows: slice):
    """The eraser rows `rows` of phi (every leaf's leading axis)."""
    return jax.tree.map(lambda a: a[rows], phi)


def _stack(model, site: EraserSite):
    return getattr(getattr(model, "base", model), site.stack)


def block_params(model, site: EraserSite | None = None) -> dict[str, jax.Array]:
    """Flat dotted path -> stacked array of the eraser stack's parameters."""
    site = site or site_of(model)
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(_stack(model, site), nnx.Param))}


def _keeps(cfg: EraserConfig, site: EraserSite):
    """Which block parameters an attn / full eraser fine-tunes."""
    if cfg.kind == "attn":
        return lambda path: path.startswith(site.attention + ".")
    return lambda path: True


def init_erasers(cfg: EraserConfig, model, key) -> dict:
    """Fresh trainable parameters (fp32) for `model`; the erased model starts equal to the base."""
    site = site_of(model)
    check_kind(cfg.kind, site)
    L, dim, r = site.num_layers, site.dim, cfg.rank
    if cfg.kind == "adapter":
        k1, k2 = jax.random.split(key)
        return {"down": {"kernel": _torch_linear_uniform(k1, (L, dim, r), dim),
                         "bias": _torch_linear_uniform(k2, (L, r), dim)},
                "up": {"kernel": jnp.zeros((L, r, dim), jnp.float32), "bias": jnp.zeros((L, dim), jnp.float32)}}
    if cfg.kind == "lora":
        unknown = [t for t in cfg.lora_targets if t not in site.lora_targets]
        if unknown:
            raise UnlearnError(f"lora_targets {unknown}: this model's erasers can target {sorted(site.lora_targets)}")
        out = {}
        for i, name in enumerate(cfg.lora_targets):
            din, dout = site.lora_targets[name]
            out[name] = {"a": _torch_linear_uniform(jax.random.fold_in(key, i), (L, din, r), din),
                         "b": jnp.zeros((L, r, dout), jnp.float32)}
        return out
    keep = _keeps(cfg, site)
    # A real copy: an fp32 base leaf would otherwise be the same buffer, and training donates phi.
    return {p: jnp.array(v, dtype=jnp.float32, copy=True) for p, v in block_params(model, site).items() if keep(p)}


def eraser_axes(cfg: EraserConfig, phi: dict, model=None) -> dict:
    """Logical axis names of every eraser leaf (for sharding them like the model)."""
    if cfg.kind == "adapter":
        return {"down": {"kernel": ("layers", "embed", "rank"), "bias": ("layers", "rank")},
                "up": {"kernel": ("layers", "rank", "embed"), "bias": ("layers", "embed")}}
    if cfg.kind == "lora":
        return {n: {"a": ("layers", "embed", "rank"), "b": ("layers", "rank", "heads")} for n in phi}
    if model is None:
        raise ValueError("fine-tuned erasers take their axes from the model")
    site = site_of(model)
    axes = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
            for p, v in nnx.to_flat_state(nnx.state(_stack(model, site), nnx.Param))}
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
        def edit_layer(layer_state, extra, attention):
            base = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(layer_state)}
            new = {}
            for name, ab in extra.items():
                k = f"{attention}.{name}.kernel"
                new[k] = base[k].astype(jnp.float32) + s * (ab["a"] @ ab["b"])
            return _replace_leaves(layer_state, new)

        return Hooks(edit_layer=edit_layer), phi

    def edit_layer(layer_state, extra, attention):
        return _replace_leaves(layer_state, extra)

    return Hooks(edit_layer=edit_layer), phi


def count_params(phi) -> int:
    return int(sum(x.size for x in jax.tree.leaves(phi)))


def model_and_site(model):
    """(abstract-or-real model, site) of a model, an erased model, or a transformer config."""
    from unlearn_jax import families

    model = getattr(model, "base", model)
    if hasattr(model, "config"):
        return model, site_of(model)
    family = families.of_config(model)
    return None, family.eraser_site(model)


def eraser_shapes(cfg: EraserConfig, model) -> dict[str, tuple]:
    """Flat key -> shape of every eraser leaf `cfg` gives for `model` (a model or its config)."""
    base, site = model_and_site(model)
    check_kind(cfg.kind, site)
    L, D, r = site.num_layers, site.dim, cfg.rank
    if cfg.kind == "adapter":
        return {"down.kernel": (L, D, r), "down.bias": (L, r), "up.kernel": (L, r, D), "up.bias": (L, D)}
    if cfg.kind == "lora":
        out = {}
        for t in cfg.lora_targets:
            din, dout = site.lora_targets[t]
            out[f"{t}.a"], out[f"{t}.b"] = (L, din, r), (L, r, dout)
        return out
    if base is None:
        from unlearn_jax import families

        base = families.of_config(model).abstract_transformer(model)
    keep = _keeps(cfg, site)
    stack = nnx.state(_stack(base, site), nnx.Param)
    return {k: s for k, s in ((".".join(map(str, p)), tuple(v.shape)) for p, v in nnx.to_flat_state(stack)) if keep(k)}


def flatten_phi(phi) -> dict[str, Any]:
    """Nested phi -> {dotted key: array} (attn/full phi is flat already)."""
    out = {}
    for k, v in phi.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten_phi(v).items()})
        else:
            out[k] = v
    return out


def check_phi(cfg: EraserConfig, phi, model, where: str):
    """Every eraser leaf present with the shape `model` needs; one error lists every problem."""
    from unlearn_jax.errors import ConversionError

    want = eraser_shapes(cfg, model)
    got = {k: tuple(jnp.shape(v)) for k, v in flatten_phi(phi).items()}
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: {got[k]}, expected {want[k]}" for k in want if k in got and got[k] != want[k]]
    if problems:
        raise ConversionError(f"{where}: {cfg.kind} erasers do not fit the model: " + "; ".join(problems[:20]))


def merge_erasers(model, cfg: EraserConfig, phi, scale=None):
    """A copy of `model` whose eraser-stack weights have the erasers folded in: `W + s * a @ b` for
    LoRA, the fine-tuned weights for attn / full. Adapters are nonlinear and cannot be merged."""
    model = getattr(model, "base", model)  # an erased model: its base
    if cfg.kind == "adapter":
        raise UnlearnError("adapter erasers cannot be merged into the base weights (the adapter is nonlinear): "
                           "export them with --format t2vunlearning and attach them with "
                           "unlearn_jax.torch.attach_erasers")
    check_phi(cfg, phi, model, "merge_erasers")
    parts = expert_rows(model)
    if parts is not None:  # each expert with its own rows folded in
        return model.with_experts({name: merge_erasers(part, cfg, take_layers(phi, rows), scale)
                                   for name, part, rows in parts})
    site = site_of(model)
    s = cfg.scale if scale is None else scale
    new = {}
    if cfg.kind == "lora":
        base = block_params(model, site)
        for name, ab in phi.items():
            k = f"{site.attention}.{name}.kernel"
            delta = jnp.einsum("lir,lro->lio", jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            new[k] = base[k].astype(jnp.float32) + s * delta
    else:
        new = dict(phi)
    graphdef, state = nnx.split(model)
    prefix = site.stack + "."
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        sub = key[len(prefix):] if key.startswith(prefix) else None
        if sub in new:
            var = var.replace(jnp.asarray(new[sub]).astype(var[...].dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
