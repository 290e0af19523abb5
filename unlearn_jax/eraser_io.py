"""Eraser files and exports: our eraser folders, the published T2VUnlearning format, LoRA, merged weights.

Formats (ALGORITHM.md §8):

- ours: `eraser_config.json` (`eraser_type`, `eraser_rank` as in the published format, plus
  `scale`, `lora_targets`, `num_layers`, `dim`, `base_model`, `format: "unlearn-jax"`) and
  `erasers.safetensors` holding `phi` in its JAX layout with flat keys (`down.kernel`,
  `to_q.a`, `attn1.to_q.kernel`...). Any eraser kind.
- published (T2VUnlearning): `eraser_config.json` = `{"eraser_type": "adapter", "eraser_rank": r}` and
  `eraser_weights.pt`, a `torch.save`d dict `"transformer_blocks.{i}.attn1.adapter"` -> state dict
  (`down.weight` (r, dim), `down.bias`, `up.weight` (dim, r), `up.bias`); we also write/read the same
  tensors as `eraser_weights.safetensors` (keys `transformer_blocks.{i}.attn1.adapter.down.weight`...).
  `.pt` files are read only with `torch.load(..., weights_only=True)`.
- LoRA: `pytorch_lora_weights.safetensors` in the layout `CogVideoXPipeline.load_lora_weights` reads.
- merged: a plain diffusers transformer folder with LoRA / fine-tuned weights folded in.

Every import checks the tensors against the base model (blocks, width, rank) and names what does not
fit in one line; every export is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.atomic import atomic_dir
from unlearn_jax.conversion import (IDENTITY, LINEAR, Rule, RuleTable, SafetensorsReader, Target, iter_torch_tensors,
                                    load_params, write_safetensors)
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.erasers import KINDS, EraserConfig, eraser_axes, eraser_hooks
from unlearn_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer, abstract_model

FORMAT = "unlearn-jax"
CONFIG_NAME = "eraser_config.json"
WEIGHTS_NAME = "erasers.safetensors"
PUBLISHED_PT = "eraser_weights.pt"
PUBLISHED_SAFETENSORS = "eraser_weights.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
README_NAME = "README.md"

# diffusers module path of each LoRA target inside a block's attn1
_LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


# --------------------------------------------------------------------------------------------
# Rule tables: the published adapter keys and the diffusers LoRA keys <-> our phi leaves
# --------------------------------------------------------------------------------------------
def published_rule_table(num_layers: int) -> RuleTable:
    """T2VUnlearning's `transformer_blocks.{i}.attn1.adapter.*` tensors <-> our stacked adapter leaves."""
    pre = "transformer_blocks.{layer}.attn1.adapter."
    return RuleTable([
        Rule(pre + "down.weight", "down.kernel", LINEAR),
        Rule(pre + "down.bias", "down.bias", IDENTITY),
        Rule(pre + "up.weight", "up.kernel", LINEAR),
        Rule(pre + "up.bias", "up.bias", IDENTITY),
    ], num_layers, family="T2VUnlearning adapter eraser")


def lora_rule_table(lora_targets, num_layers: int) -> RuleTable:
    """diffusers/PEFT LoRA keys (`lora_A.weight` (r, in), `lora_B.weight` (out, r)) <-> our `a`/`b` leaves."""
    rules = []
    for t in lora_targets:
        pre = f"transformer.transformer_blocks.{{layer}}.attn1.{_LORA_MODULES[t]}."
        rules.append(Rule(pre + "lora_A.weight", f"{t}.a", LINEAR))
        rules.append(Rule(pre + "lora_B.weight", f"{t}.b", LINEAR))
    return RuleTable(rules, num_layers, family="CogVideoX LoRA")


# --------------------------------------------------------------------------------------------
# Shapes and flat <-> nested phi
# --------------------------------------------------------------------------------------------
def _base(model) -> CogVideoXTransformer:
    """A (possibly abstract) CogVideoXTransformer from a model, an ErasedTransformer or a config."""
    if isinstance(model, ErasedTransformer):
        return model.base
    if isinstance(model, CogVideoXTransformer):
        return model
    if isinstance(model, CogVideoXConfig):
        return abstract_model(model)
    raise TypeError(f"expected a CogVideoXTransformer, an ErasedTransformer or a CogVideoXConfig, got {type(model)}")


def _model_config(model) -> CogVideoXConfig:
    return model if isinstance(model, CogVideoXConfig) else model.config


def _block_shapes(base: CogVideoXTransformer) -> dict[str, tuple]:
    return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(base.blocks, nnx.Param))}


def eraser_shapes(cfg: EraserConfig, model) -> dict[str, tuple]:
    """Flat key -> shape of every eraser leaf `cfg` gives for `model` (a model or its config)."""
    mc = _model_config(model)
    L, D, r = mc.num_layers, mc.inner_dim, cfg.rank
    if cfg.kind == "adapter":
        return {"down.kernel": (L, D, r), "down.bias": (L, r), "up.kernel": (L, r, D), "up.bias": (L, D)}
    if cfg.kind == "lora":
        out = {}
        for t in cfg.lora_targets:
            out[f"{t}.a"], out[f"{t}.b"] = (L, D, r), (L, r, D)
        return out
    shapes = _block_shapes(_base(model))
    return {k: s for k, s in shapes.items() if cfg.kind == "full" or k.startswith("attn1.")}


def flatten_phi(phi: Mapping) -> dict[str, Any]:
    """Nested phi -> {dotted key: array} (attn/full phi is flat already)."""
    out = {}
    for k, v in phi.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten_phi(v).items()})
        else:
            out[k] = v
    return out


def unflatten_phi(cfg: EraserConfig, flat: Mapping[str, Any]) -> dict:
    """{dotted key: array} -> phi in the layout `erasers.py` uses for `cfg.kind`."""
    if cfg.kind in ("attn", "full"):
        return dict(flat)
    out: dict = {}
    for k, v in flat.items():
        head, leaf = k.split(".", 1)
        out.setdefault(head, {})[leaf] = v
    return out


def _check_phi(cfg: EraserConfig, phi, model, where: str):
    want = eraser_shapes(cfg, model)
    got = {k: tuple(np.shape(v)) for k, v in flatten_phi(phi).items()}
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: {got[k]}, expected {want[k]}" for k in want if k in got and got[k] != want[k]]
    if problems:
        raise ConversionError(f"{where}: {cfg.kind} erasers do not fit the model: " + "; ".join(problems[:20]))


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------
# Our folder format
# --------------------------------------------------------------------------------------------
def _config_json(cfg: EraserConfig, mc: CogVideoXConfig) -> dict:
    return {"eraser_type": cfg.kind, "eraser_rank": cfg.rank, "scale": cfg.scale,
            "lora_targets": list(cfg.lora_targets), "num_layers": mc.num_layers, "dim": mc.inner_dim,
            "format": FORMAT, "base_model": mc.to_dict()}


def save_erasers(folder, cfg: EraserConfig, phi: Mapping, model_config) -> Path:
    """Writes `phi` as an eraser folder of ours (`eraser_config.json` + `erasers.safetensors`), atomically.

    model_config: the base model's `CogVideoXConfig` (or the model itself); the shapes are checked
    against it so that a folder that does not fit is never written.
    """
    mc = _model_config(model_config)
    _check_phi(cfg, phi, model_config, str(folder))
    flat = {k: _host(v) for k, v in sorted(flatten_phi(phi).items())}
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(_config_json(cfg, mc), indent=2) + "\n")
        write_safetensors(tmp / WEIGHTS_NAME, flat)
    return Path(folder)


class _ArrayReader:
    """The `SafetensorsReader` interface over in-memory numpy arrays (tensors of a .pt file)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = dict(arrays)

    def keys(self):
        return list(self._arrays)

    def shape(self, key):
        return tuple(self._arrays[key].shape)

    def dtype(self, key):
        return self._arrays[key].dtype

    def get(self, key, out=None):
        a = self._arrays[key]
        if out is None:
            return a
        out[...] = a
        return out

    def close(self):
        pass


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else (text or type(e).__name__)


def _eraser_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise UnlearnError(f"{folder}: no such eraser folder")
    if not folder.is_dir():
        weights = (PUBLISHED_PT, PUBLISHED_SAFETENSORS, WEIGHTS_NAME)
        if folder.name in weights and (folder.parent / CONFIG_NAME).exists():
            return folder.parent
        raise UnlearnError(f"{folder}: expected an eraser folder (with {CONFIG_NAME}), got a file")
    if not (folder / CONFIG_NAME).exists():
        raise UnlearnError(f"{folder}: not an eraser folder (no {CONFIG_NAME}; a T2VUnlearning eraser folder has "
                           f"{CONFIG_NAME} + {PUBLISHED_PT})")
    return folder


def _config_from_json(d: dict, where: Path) -> EraserConfig:
    kind, rank = d.get("eraser_type"), d.get("eraser_rank")
    if kind not in KINDS:
        raise UnlearnError(f"{where}: eraser_type {kind!r} is not one of {KINDS}")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise UnlearnError(f"{where}: eraser_rank must be an integer, got {rank!r}")
    try:
        return EraserConfig(kind=kind, rank=rank, scale=float(d.get("scale", 1.0)),
                            lora_targets=tuple(d.get("lora_targets", EraserConfig.lora_targets)))
    except (TypeError, ValueError) as e:
        raise UnlearnError(f"{where}: {_one_line(e)}") from None


def _fit_model(where, found_layers: int, found_dim: int, model_layers: int, model_dim: int):
    if found_layers != model_layers or found_dim != model_dim:
        raise ModelFamilyError(
            f"{where}: erasers for a transformer with {found_layers} blocks of width {found_dim}, but the model has "
            f"{model_layers} blocks of width {model_dim} (erasers trained on another base model?)")


def _fit_rank(where, cfg_rank: int, found_rank: int):
    if cfg_rank != found_rank:
        raise ConversionError(f"{where}: {CONFIG_NAME} says eraser_rank {cfg_rank}, but the weights have rank "
                              f"{found_rank} (config and weights come from different erasers?)")


def _load_flat(reader, shapes: Mapping[str, tuple], where: str, family: str, num_layers: int,
               table: RuleTable | None = None) -> dict[str, jax.Array]:
    """Reads every eraser leaf (fp32); one error lists all missing, unexpected and misshaped tensors."""
    if table is None:  # our format: the file's keys are the leaves' own names
        table = RuleTable([Rule(k, k) for k in shapes], num_layers, family=family)
    targets = {k: Target(tuple(s), np.dtype(np.float32), None) for k, s in shapes.items()}
    try:
        return load_params(reader, table, targets, where)
    finally:
        reader.close()


def load_erasers(folder, model=None) -> tuple[EraserConfig, dict]:
    """Reads an eraser folder (ours, or the published T2VUnlearning format) -> (EraserConfig, phi in fp32).

    model: the base model (or its `CogVideoXConfig`) the erasers will run on; every tensor is checked
    against it. Without it, the folder is only checked for consistency with itself.
    """
    folder = _eraser_folder(folder)
    cfg_path = folder / CONFIG_NAME
    d = read_json_object(cfg_path, "eraser config")
    if d.get("format") == FORMAT:
        return _load_ours(folder, d, model)
    if "eraser_type" in d:
        return _load_published(folder, d, model)
    raise UnlearnError(f"{cfg_path}: not an eraser config (no 'eraser_type' key)")


def _load_ours(folder: Path, d: dict, model) -> tuple[EraserConfig, dict]:
    cfg_path = folder / CONFIG_NAME
    cfg = _config_from_json(d, cfg_path)
    stored_cfg = None
    if isinstance(d.get("base_model"), dict):
        stored_cfg = CogVideoXConfig.from_dict(d["base_model"], f"{cfg_path} base_model")
    if model is None:
        if stored_cfg is None:
            raise UnlearnError(f"{cfg_path}: no base_model recorded; pass the base model to check the erasers against")
        model = stored_cfg
    mc = _model_config(model)
    if "num_layers" in d and "dim" in d:
        _fit_model(cfg_path, int(d["num_layers"]), int(d["dim"]), mc.num_layers, mc.inner_dim)
    path = folder / WEIGHTS_NAME
    if not path.exists():
        raise UnlearnError(f"{folder}: {WEIGHTS_NAME} is missing (an unlearn-jax eraser folder holds {CONFIG_NAME} "
                           f"+ {WEIGHTS_NAME})")
    reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
    try:
        probe = {"adapter": "down.kernel", "lora": f"{cfg.lora_targets[0]}.a"}.get(cfg.kind)
        if probe in reader.keys():
            _fit_rank(path, cfg.rank, reader.shape(probe)[-1])
    except BaseException:
        reader.close()
        raise
    flat = _load_flat(reader, eraser_shapes(cfg, model), str(path), f"unlearn-jax {cfg.kind} eraser", mc.num_layers)
    return cfg, unflatten_phi(cfg, flat)


_PUBLISHED_KEY = re.compile(r"^transformer_blocks\.(\d+)\.attn1\.adapter\.")


def _torch_load_published(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a published `eraser_weights.pt`, flattened to `module.param` keys, as fp32 numpy."""
    try:
        import pickle

        import torch
    except ImportError:
        raise UnlearnError(f"{path}: reading .pt erasers needs PyTorch (pip install 'unlearn-jax[torch]'); or use "
                           f"the {PUBLISHED_SAFETENSORS} beside it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "global" in msg.lower():
            why = "it holds Python objects other than tensors and dicts"
        else:
            why = "it is not a torch.save file of tensors (corrupt or truncated?)"
        raise UnlearnError(f"{path}: refused by torch.load(weights_only=True): {why}; eraser .pt files are never "
                           "unpickled beyond plain tensors (ask for a safetensors file)") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / ... on corrupt or truncated archives
        raise UnlearnError(f"{path}: not a readable PyTorch file (corrupt or truncated?): "
                           f"{type(e).__name__}: {_one_line(e, 120)}") from None
    if not isinstance(obj, Mapping):
        raise UnlearnError(f"{path}: expected a dict of per-block state dicts, got a {type(obj).__name__}")
    out = {}
    for module, sd in obj.items():
        if not isinstance(sd, Mapping):
            raise UnlearnError(f"{path}: entry {module!r} is a {type(sd).__name__}, expected a state dict")
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise UnlearnError(f"{path}: {module}.{name} is not a floating-point tensor")
            out[f"{module}.{name}"] = t.detach().to(torch.float32).contiguous().numpy()
    return out


def _load_published(folder: Path, d: dict, model) -> tuple[EraserConfig, dict]:
    cfg_path = folder / CONFIG_NAME
    if d.get("eraser_type") != "adapter":
        raise UnlearnError(f"{cfg_path}: eraser_type {d.get('eraser_type')!r}: the T2VUnlearning format holds "
                           "adapter erasers only")
    cfg = _config_from_json(d, cfg_path)
    st, pt = folder / PUBLISHED_SAFETENSORS, folder / PUBLISHED_PT
    if st.exists():
        reader, path = SafetensorsReader(folder, prefer=PUBLISHED_SAFETENSORS), st
    elif pt.exists():
        reader, path = _ArrayReader(_torch_load_published(pt)), pt
    else:
        raise UnlearnError(f"{folder}: no eraser weights ({PUBLISHED_PT} or {PUBLISHED_SAFETENSORS}) beside "
                           f"{CONFIG_NAME}")
    try:
        keys = reader.keys()
        if keys and not any(_PUBLISHED_KEY.match(k) for k in keys):
            other = "HunyuanVideo " if any(k.startswith("single_transformer_blocks.") for k in keys) else ""
            raise ModelFamilyError(f"{path}: holds {other}erasers for another model family (keys like {keys[0]!r}), "
                                   "not CogVideoX's transformer_blocks.{i}.attn1.adapter")
        layers = {int(m.group(1)) for k in keys if (m := _PUBLISHED_KEY.match(k))}
        probe = "transformer_blocks.0.attn1.adapter.down.weight"
        if probe in keys and len(reader.shape(probe)) == 2:
            found_rank, found_dim = reader.shape(probe)
            if model is None:
                model_layers, model_dim = max(layers) + 1, found_dim
            else:
                mc = _model_config(model)
                model_layers, model_dim = mc.num_layers, mc.inner_dim
            _fit_model(path, max(layers) + 1, found_dim, model_layers, model_dim)
            _fit_rank(path, cfg.rank, found_rank)
        elif model is None:
            raise ConversionError(f"{path}: no {probe} tensor (not a T2VUnlearning CogVideoX eraser?)")
        else:
            mc = _model_config(model)
            model_layers, model_dim = mc.num_layers, mc.inner_dim
    except BaseException:
        reader.close()
        raise
    L, D, r = model_layers, model_dim, cfg.rank
    shapes = {"down.kernel": (L, D, r), "down.bias": (L, r), "up.kernel": (L, r, D), "up.bias": (L, D)}
    flat = _load_flat(reader, shapes, str(path), "T2VUnlearning eraser", L, published_rule_table(L))
    return cfg, unflatten_phi(cfg, flat)


# --------------------------------------------------------------------------------------------
# The erased model
# --------------------------------------------------------------------------------------------
class EraserParam(nnx.Param):
    """Trainable eraser weights (select them with `nnx.state(model, EraserParam)`)."""


class ErasedTransformer(nnx.Module):
    """A base `CogVideoXTransformer` with erasers attached; called like the base model.

    `model(x, ctx, t)` is the erased velocity; `erasers_on=False` gives the base model's, `scale`
    overrides the eraser scale (0 = off). The base weights are shared, never copied.
    """

    def __init__(self, base: CogVideoXTransformer, eraser_config: EraserConfig, phi: Mapping):
        if isinstance(base, ErasedTransformer):
            base = base.base
        _check_phi(eraser_config, phi, base, "attach_erasers")
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
    def config(self) -> CogVideoXConfig:
        return self.base.config

    @property
    def runtime(self):
        return self.base.runtime

    def eraser_params(self) -> dict:
        """phi as a plain pytree of arrays."""
        return jax.tree.map(lambda v: v[...], self.phi, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def forward(self, hidden_states, encoder_hidden_states, timestep, erasers_on: bool = True, scale=None,
                collect_outputs: bool = False):
        """(velocity, aux) like `CogVideoXTransformer.forward`, with the erasers applied."""
        phi = self.eraser_params() if erasers_on else None
        hooks, extras = eraser_hooks(self.eraser_config, phi, scale, collect_outputs)
        return self.base.forward(hidden_states, encoder_hidden_states, timestep, hooks, extras)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, erasers_on: bool = True, scale=None):
        """diffusers-style forward (jitted): (B, F, C, H, W), (B, L, D), (B,) -> velocity."""
        self.base.check_inputs(jnp.shape(hidden_states), jnp.shape(encoder_hidden_states))
        graphdef, state = nnx.split(self)
        s = jnp.asarray(self.eraser_config.scale if scale is None else scale, jnp.float32)
        return _erased_forward(graphdef, state, jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states),
                               jnp.asarray(timestep), s, bool(erasers_on))

    def merged(self) -> CogVideoXTransformer:
        """The base model with the erasers folded into its weights (lora / attn / full kinds)."""
        return merge_erasers(self.base, self.eraser_config, self.eraser_params())

    def save_erasers(self, folder) -> Path:
        return save_erasers(folder, self.eraser_config, self.eraser_params(), self.base.config)


@functools.partial(jax.jit, static_argnames=("erasers_on",))
def _erased_forward(graphdef, state, x, ctx, t, scale, erasers_on):
    return nnx.merge(graphdef, state).forward(x, ctx, t, erasers_on=erasers_on, scale=scale)[0]


def attach_erasers(model, erasers) -> ErasedTransformer:
    """`model` with erasers attached: `erasers` is an eraser folder (ours or the published format) or
    a `(EraserConfig, phi)` pair. Checks every tensor against the model."""
    base = model.base if isinstance(model, ErasedTransformer) else model
    if isinstance(erasers, (str, os.PathLike)):
        cfg, phi = load_erasers(erasers, base)
    elif isinstance(erasers, tuple) and len(erasers) == 2 and isinstance(erasers[0], EraserConfig):
        cfg, phi = erasers
    else:
        raise UnlearnError(f"erasers={erasers!r}: give an eraser folder or an (EraserConfig, phi) pair")
    return ErasedTransformer(base, cfg, phi)


# --------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------
def merge_erasers(model: CogVideoXTransformer, cfg: EraserConfig, phi: Mapping, scale=None) -> CogVideoXTransformer:
    """A copy of `model` whose block weights have the erasers folded in: `W + s * a @ b` for LoRA, the
    fine-tuned weights for attn / full. Adapters are nonlinear and cannot be merged."""
    if isinstance(model, ErasedTransformer):
        model = model.base
    if cfg.kind == "adapter":
        raise UnlearnError("adapter erasers cannot be merged into the base weights (the adapter is nonlinear): "
                           "export them with --format t2vunlearning and attach them with "
                           "unlearn_jax.torch.attach_erasers")
    _check_phi(cfg, phi, model, "merge_erasers")
    s = cfg.scale if scale is None else scale
    new = {}
    if cfg.kind == "lora":
        base = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))}
        for name, ab in phi.items():
            k = f"attn1.{name}.kernel"
            delta = jnp.einsum("lir,lro->lio", jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            new[k] = base[k][...].astype(jnp.float32) + s * delta
    else:
        new = dict(phi)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        sub = key[len("blocks."):] if key.startswith("blocks.") else None
        if sub in new:
            var = var.replace(jnp.asarray(new[sub]).astype(var[...].dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_merged(folder, base_model: CogVideoXTransformer, cfg: EraserConfig, phi: Mapping, dtype=None) -> Path:
    """A plain diffusers transformer folder (lora / attn / full erasers folded into the weights) that
    `CogVideoXTransformer3DModel.from_pretrained` loads as is."""
    from unlearn_jax.loading import save_transformer

    return save_transformer(merge_erasers(base_model, cfg, phi), folder, dtype=dtype)


def _cast(arr: np.ndarray, dtype) -> np.ndarray:
    if dtype is None:
        return arr
    from unlearn_jax.loading import as_dtype

    return arr.astype(as_dtype(dtype))


def _published_tensors(cfg: EraserConfig, phi: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """The published layout's tensors (scale folded into `up`, so the authors' code, which has no scale,
    runs the same eraser)."""
    if cfg.kind != "adapter":
        raise UnlearnError(f"the T2VUnlearning format holds adapter erasers only; these are {cfg.kind!r} erasers "
                           "(use --format lora or --format diffusers --base BASE)")
    leaves = {k: _host(v).astype(np.float32, copy=False) for k, v in flatten_phi(phi).items()}
    if cfg.scale != 1.0:
        leaves["up.kernel"] = leaves["up.kernel"] * np.float32(cfg.scale)
        leaves["up.bias"] = leaves["up.bias"] * np.float32(cfg.scale)
    L = leaves["down.kernel"].shape[0]
    _, gen = iter_torch_tensors(published_rule_table(L), leaves)
    return {k: _cast(np.asarray(a), dtype) for k, a in gen}


def _write_published(tmp: Path, cfg: EraserConfig, tensors: Mapping[str, np.ndarray]):
    import torch

    blocks: dict[str, collections.OrderedDict] = {}
    for key, arr in tensors.items():
        module, _, param = key.partition(".adapter.")
        if arr.dtype in (np.float32, np.float16):
            t = torch.from_numpy(np.array(arr))
        else:  # bfloat16: cast on the torch side (the same round-to-nearest-even as ml_dtypes)
            t = torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
        blocks.setdefault(module + ".adapter", collections.OrderedDict())[param] = t
    (tmp / CONFIG_NAME).write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": cfg.rank}, indent=4))
    torch.save(blocks, tmp / PUBLISHED_PT)
    write_safetensors(tmp / PUBLISHED_SAFETENSORS, dict(tensors))


def export_t2vunlearning(folder, cfg: EraserConfig, phi: Mapping, dtype=None, readme: bool = False) -> Path:
    """The published T2VUnlearning eraser folder: `eraser_config.json` + `eraser_weights.pt` (a torch.save'd
    dict of per-block state dicts) + the same tensors as `eraser_weights.safetensors`. Adapter kind only.

    dtype: write the tensors in this dtype (default fp32). readme: add a README.md on how to load it.
    Needs PyTorch (to write the .pt file).
    """
    tensors = _published_tensors(cfg, phi, dtype)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UnlearnError("writing eraser_weights.pt needs PyTorch (pip install 'unlearn-jax[torch]')") from None
    with atomic_dir(folder) as tmp:
        _write_published(tmp, cfg, tensors)
        if readme:
            (tmp / README_NAME).write_text(_ADAPTER_README)
    return Path(folder)


_ADAPTER_README = """\
# Concept eraser (T2VUnlearning adapter format)

Adapters on each CogVideoX block's attention output; a stock diffusers pipeline runs them with:

    import unlearn_jax.torch; unlearn_jax.torch.attach_erasers(pipe.transformer, "THIS_FOLDER")

The folder also loads in the T2VUnlearning authors' inference scripts (eraser_config.json + eraser_weights.pt)
and in JAX with `unlearn_jax.load_transformer(BASE, erasers="THIS_FOLDER")`.
"""

_LORA_README = """\
# Concept eraser (LoRA)

    pipe.load_lora_weights("THIS_FOLDER")   # a diffusers CogVideoXPipeline (needs `peft`)
"""


def export_lora(folder, cfg: EraserConfig, phi: Mapping, dtype=None, readme: bool = False) -> Path:
    """LoRA erasers as `pytorch_lora_weights.safetensors` that `CogVideoXPipeline.load_lora_weights` (or
    `transformer.load_lora_adapter`) reads. The eraser scale is folded into `lora_B`, so the loaded model
    (PEFT's default alpha = rank, scaling 1) equals ours."""
    if cfg.kind != "lora":
        raise UnlearnError(f"--format lora exports LoRA erasers; these are {cfg.kind!r} erasers "
                           + ("(use --format t2vunlearning)" if cfg.kind == "adapter"
                              else "(use --format diffusers --base BASE for merged weights)"))
    leaves = {}
    for name, ab in phi.items():
        leaves[f"{name}.a"] = _host(ab["a"]).astype(np.float32, copy=False)
        leaves[f"{name}.b"] = _host(ab["b"]).astype(np.float32, copy=False) * np.float32(cfg.scale)
    L = next(iter(leaves.values())).shape[0]
    table = lora_rule_table([t for t in cfg.lora_targets if t in phi], L)
    specs, gen = iter_torch_tensors(table, leaves)
    if dtype is not None:
        from unlearn_jax.loading import as_dtype

        dt = as_dtype(dtype)
        specs = {k: (s, dt) for k, (s, _) in specs.items()}
        gen = ((k, a.astype(dt)) for k, a in gen)
    with atomic_dir(folder) as tmp:
        write_safetensors(tmp / LORA_WEIGHTS, gen, specs)
        if readme:
            (tmp / README_NAME).write_text(_LORA_README)
    return Path(folder)


def export(folder, fmt: str, cfg: EraserConfig, phi: Mapping, base_model=None, dtype=None) -> Path:
    """The exports of `jax_to_diffusers.py` for erasers: fmt in diffusers | t2vunlearning | lora.

    diffusers: lora / attn / full -> a merged transformer folder (needs `base_model`); adapter -> the eraser
    folder that `unlearn_jax.torch.attach_erasers` reads (a stock diffusers folder cannot hold an adapter).
    """
    if fmt == "t2vunlearning":
        return export_t2vunlearning(folder, cfg, phi, dtype=dtype)
    if fmt == "lora":
        return export_lora(folder, cfg, phi, dtype=dtype, readme=True)
    if fmt != "diffusers":
        raise UnlearnError(f"format {fmt!r}: choose diffusers, t2vunlearning or lora")
    if cfg.kind == "adapter":
        return export_t2vunlearning(folder, cfg, phi, dtype=dtype, readme=True)
    if base_model is None:
        raise UnlearnError(f"--format diffusers for {cfg.kind} erasers writes the merged model: give the base "
                           "model with --base BASE_MODEL_DIR (the diffusers folder the erasers were trained on)")
    return export_merged(folder, base_model, cfg, phi, dtype=dtype)


def is_eraser_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).exists()


__all__ = ["ErasedTransformer", "EraserParam", "attach_erasers", "eraser_shapes", "export", "export_lora",
           "export_merged", "export_t2vunlearning", "flatten_phi", "is_eraser_folder", "load_erasers",
           "lora_rule_table", "merge_erasers", "published_rule_table", "save_erasers", "unflatten_phi"]
