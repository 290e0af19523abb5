"""Eraser file formats: our eraser folders, the published T2VUnlearning format, diffusers LoRA keys.

Formats (docs/METHOD.md §8):

- ours: `eraser_config.json` (`eraser_type`, `eraser_rank` as in the published format, plus
  `scale`, `lora_targets`, `num_layers`, `dim`, `base_model` (the base transformer's config, so
  the family is known), `format: "unlearn-jax"`) and `erasers.safetensors` holding `phi` in its
  JAX layout with flat keys (`down.kernel`, `to_q.a`, `attn1.to_q.kernel`...). Any eraser kind.
- published (T2VUnlearning): `eraser_config.json` = `{"eraser_type": "adapter", "eraser_rank": r}` and
  `eraser_weights.pt`, a `torch.save`d dict `"<family's published prefix>"` -> state dict (`down.weight`
  (r, dim), `down.bias`, `up.weight` (dim, r), `up.bias`); CogVideoX's prefix is
  `transformer_blocks.{i}.attn1.adapter`. We also read the same tensors as `eraser_weights.safetensors`.
  `.pt` files are read only with `torch.load(..., weights_only=True)`.
- LoRA: the keys `<lora_prefix>.<stack>.{i}.<attention>.<module>.lora_A/B.weight` that diffusers'
  `load_lora_weights` reads.

A model of several experts (Wan 2.2 A14B): our folder holds all experts' rows in one stack (the
high-noise expert's first) and names the experts in `experts` (`["transformer", "transformer_2"]`,
with `expert_layers`, the rows of each); the published format and LoRA files are per expert (one
folder or file each, `export`), and `load_erasers(folder, experts_model)` also reads a folder
holding one published eraser folder per expert (`<folder>/transformer/`, `<folder>/transformer_2/`).

The key tables come from the family's `EraserSite`. Every import checks the tensors against the
base model (blocks, width, rank) and names what does not fit in one line. Writing the exports is
`unlearn_jax.export`'s; the erased model is `unlearn_jax.erased_model`'s.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from unlearn_jax import families
from unlearn_jax.atomic import atomic_dir
from unlearn_jax.conversion import IDENTITY, LINEAR, Rule, RuleTable, SafetensorsReader, Target, load_params, \
    write_safetensors
from unlearn_jax.erasers import KINDS, EraserConfig, check_phi, eraser_shapes, expert_rows, flatten_phi, model_and_site
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.families.base import EraserSite
from unlearn_jax.jsonfiles import read_json_object

FORMAT = "unlearn-jax"
CONFIG_NAME = "eraser_config.json"
WEIGHTS_NAME = "erasers.safetensors"
PUBLISHED_PT = "eraser_weights.pt"
PUBLISHED_SAFETENSORS = "eraser_weights.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
README_NAME = "README.md"

__all__ = ["CONFIG_NAME", "FORMAT", "LORA_WEIGHTS", "PUBLISHED_PT", "PUBLISHED_SAFETENSORS", "WEIGHTS_NAME",
           "check_phi", "eraser_shapes", "expert_lora_weights", "flatten_phi", "is_eraser_folder", "load_erasers",
           "lora_rule_table", "published_rule_table", "save_erasers", "site_for", "stored_base_config",
           "unflatten_phi"]


def expert_lora_weights(component: str) -> str:
    """The LoRA file of one expert of a model of several (Wan 2.2 A14B: `transformer_lora.safetensors` and
    `transformer_2_lora.safetensors`, read by `load_lora_weights(weight_name=...)`, the second with
    `load_into_transformer_2=True`): named by the pipeline component it loads into."""
    return f"{component}_lora.safetensors"


# --------------------------------------------------------------------------------------------
# Rule tables: the published adapter keys and the diffusers LoRA keys <-> our phi leaves
# --------------------------------------------------------------------------------------------
def site_for(model) -> EraserSite:
    """The eraser site of a model, an erased model or a transformer config."""
    return model_and_site(model)[1]


def published_rule_table(prefix: str, num_layers: int) -> RuleTable:
    """The published adapter tensors `<prefix>.{down,up}.{weight,bias}` <-> our stacked adapter leaves."""
    pre = prefix + "."
    return RuleTable([
        Rule(pre + "down.weight", "down.kernel", LINEAR),
        Rule(pre + "down.bias", "down.bias", IDENTITY),
        Rule(pre + "up.weight", "up.kernel", LINEAR),
        Rule(pre + "up.bias", "up.bias", IDENTITY),
    ], num_layers, family="T2VUnlearning adapter eraser")


def lora_rule_table(lora_targets, site: EraserSite) -> RuleTable:
    """diffusers/PEFT LoRA keys (`lora_A.weight` (r, in), `lora_B.weight` (out, r)) <-> our `a`/`b` leaves."""
    rules = []
    for t in lora_targets:
        pre = f"{site.lora_prefix}.{site.lora_module(t)}."
        rules.append(Rule(pre + "lora_A.weight", f"{t}.a", LINEAR))
        rules.append(Rule(pre + "lora_B.weight", f"{t}.b", LINEAR))
    return RuleTable(rules, site.num_layers, family="LoRA")


# --------------------------------------------------------------------------------------------
# flat <-> nested phi
# --------------------------------------------------------------------------------------------
def unflatten_phi(cfg: EraserConfig, flat: Mapping[str, Any]) -> dict:
    """{dotted key: array} -> phi in the layout `erasers.py` uses for `cfg.kind`."""
    if cfg.kind in ("attn", "full"):
        return dict(flat)
    out: dict = {}
    for k, v in flat.items():
        head, leaf = k.split(".", 1)
        out.setdefault(head, {})[leaf] = v
    return out


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------
# Our folder format
# --------------------------------------------------------------------------------------------
def _config_json(cfg: EraserConfig, model_config, site: EraserSite) -> dict:
    d = {"eraser_type": cfg.kind, "eraser_rank": cfg.rank, "scale": cfg.scale,
         "lora_targets": list(cfg.lora_targets), "num_layers": site.num_layers, "dim": site.dim}
    parts = expert_rows(model_config)
    if parts is not None:  # the rows of each expert, in order (read by unlearn_jax.torch without JAX)
        d["experts"] = [name for name, _, _ in parts]
        d["expert_layers"] = [r.stop - r.start for _, _, r in parts]
    return {**d, "format": FORMAT, "base_model": model_config.to_dict()}


def _config_of(model):
    model = getattr(model, "base", model)
    return model.config if hasattr(model, "config") else model


def save_erasers(folder, cfg: EraserConfig, phi: Mapping, model_config, *, overwrite: bool = False,
                 root=None) -> Path:
    """Writes `phi` as an eraser folder of ours (`eraser_config.json` + `erasers.safetensors`), atomically.

    model_config: the base model's transformer config (or the model itself); the shapes are checked
    against it so that a folder that does not fit is never written. overwrite / root: as
    `atomic.atomic_dir` (an earlier output of ours may be replaced, nothing else).
    """
    check_phi(cfg, phi, model_config, str(folder))
    flat = {k: _host(v) for k, v in sorted(flatten_phi(phi).items())}
    with atomic_dir(folder, overwrite, root=root) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(_config_json(cfg, _config_of(model_config),
                                                               site_for(model_config)), indent=2) + "\n")
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
        inner = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        if inner:  # one eraser folder per expert: they are read against the experts' model
            raise UnlearnError(f"{folder}: holds one eraser folder per expert ({', '.join(inner)}); read it with the "
                               "model of those experts (load_erasers(folder, model), load_transformer(PIPELINE, "
                               "erasers=folder))")
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


def stored_base_config(folder):
    """The base transformer config an eraser folder of ours records (None for the published format)."""
    d = read_json_object(_eraser_folder(folder) / CONFIG_NAME, "eraser config")
    base = d.get("base_model")
    if d.get("format") != FORMAT or not isinstance(base, dict):
        return None
    where = f"{_eraser_folder(folder) / CONFIG_NAME} base_model"
    return families.REGISTRY.by_class(base.get("_class_name"), where).transformer_config(base, where)


def load_erasers(folder, model=None) -> tuple[EraserConfig, dict]:
    """Reads an eraser folder (ours, or the published T2VUnlearning format) -> (EraserConfig, phi in fp32).

    model: the base model (or its transformer config) the erasers will run on; every tensor is checked
    against it. Without it, the folder is only checked for consistency with itself.
    """
    parts = _per_expert_folders(folder, model)
    if parts is not None:
        return _load_per_expert(Path(folder), parts)
    folder = _eraser_folder(folder)
    cfg_path = folder / CONFIG_NAME
    d = read_json_object(cfg_path, "eraser config")
    if d.get("format") == FORMAT:
        return _load_ours(folder, d, model)
    if "eraser_type" in d:
        return _load_published(folder, d, model)
    raise UnlearnError(f"{cfg_path}: not an eraser config (no 'eraser_type' key)")


def _per_expert_folders(folder, model):
    """The experts of `model` when `folder` holds one eraser folder per expert (and none of its own), else None."""
    parts = None if model is None else expert_rows(model)
    folder = Path(folder)
    if parts is None or not folder.is_dir() or (folder / CONFIG_NAME).exists():
        return None
    return parts if all((folder / name / CONFIG_NAME).is_file() for name, _, _ in parts) else None


def _load_per_expert(folder: Path, parts) -> tuple[EraserConfig, dict]:
    """Each expert's eraser folder read against that expert, the rows stacked in the experts' order."""
    import jax.numpy as jnp

    loaded = [load_erasers(folder / name, part) for name, part, _ in parts]
    kinds = {c for c, _ in loaded}
    if len(kinds) != 1:
        shown = "; ".join(f"{name}: {c.kind} rank {c.rank} scale {c.scale}" for (name, _, _), (c, _) in zip(parts, loaded))
        raise UnlearnError(f"{folder}: the experts' erasers differ ({shown}); both experts need erasers of one kind, "
                           "rank and scale")
    return loaded[0][0], jax.tree.map(lambda *a: jnp.concatenate(a), *[phi for _, phi in loaded])


def _check_experts_fit(cfg_path: Path, d: dict, model):
    """Erasers of a two-expert model on one transformer (or the other way round): one line saying so."""
    mine, theirs = d.get("experts"), expert_rows(model)
    if mine and theirs is None:
        raise ModelFamilyError(f"{cfg_path}: erasers for the experts {', '.join(mine)} of a two-expert model; this "
                               "model is one transformer: attach them to the experts (load_transformer(PIPELINE) "
                               "of the two-expert pipeline)")
    if not mine and theirs is not None and "num_layers" in d:
        raise ModelFamilyError(f"{cfg_path}: erasers for one transformer of {d['num_layers']} blocks; this model has "
                               f"the experts {', '.join(n for n, _, _ in theirs)} (train erasers on the two-expert "
                               "pipeline, or attach these to one expert: model.experts()[name])")


def _load_ours(folder: Path, d: dict, model) -> tuple[EraserConfig, dict]:
    cfg_path = folder / CONFIG_NAME
    cfg = _config_from_json(d, cfg_path)
    stored_cfg = stored_base_config(folder)
    if model is None:
        if stored_cfg is None:
            raise UnlearnError(f"{cfg_path}: no base_model recorded; pass the base model to check the erasers against")
        model = stored_cfg
    _check_experts_fit(cfg_path, d, model)
    site = site_for(model)
    if "num_layers" in d and "dim" in d:
        _fit_model(cfg_path, int(d["num_layers"]), int(d["dim"]), site.num_layers, site.dim)
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
    flat = _load_flat(reader, eraser_shapes(cfg, model), str(path), f"unlearn-jax {cfg.kind} eraser",
                      site.num_layers)
    return cfg, unflatten_phi(cfg, flat)


def _published_pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{layer}"), r"(\d+)") + r"\.")


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


def _check_published_pair(st: Path, pt: Path):
    """Both published files present: they must hold the same tensors (a replaced .pt is never ignored)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return  # the .pt cannot be read without PyTorch; the safetensors file is the one read
    reader = SafetensorsReader(st.parent, prefer=PUBLISHED_SAFETENSORS)
    try:
        st_arrays = {k: reader.get(k).astype(np.float32) for k in reader.keys()}
    finally:
        reader.close()
    pt_arrays = _torch_load_published(pt)
    differ = sorted(set(st_arrays) ^ set(pt_arrays)) or [
        k for k in st_arrays if st_arrays[k].shape != pt_arrays[k].shape or not np.array_equal(st_arrays[k], pt_arrays[k])]
    if differ:
        raise UnlearnError(f"{st.parent}: {PUBLISHED_PT} and {PUBLISHED_SAFETENSORS} hold different erasers (first "
                           f"difference: {differ[0]}); delete the one that is stale")


def _published_family(keys, path: Path, model):
    """The family whose published prefix the file's keys follow (the model's, when one is given)."""
    if model is not None:
        fam = families.of_config(_config_of(model))
        if keys and not any(_published_pattern(fam.published_prefix).match(k) for k in keys):
            other = [f.title for f in families.all_families() if f is not fam and f.published_prefix
                     and any(_published_pattern(f.published_prefix).match(k) for k in keys)]
            what = f"{other[0]} erasers" if other else "erasers of another model family"
            raise ModelFamilyError(f"{path}: holds {what} (keys like {keys[0]!r}), not "
                                   f"{fam.title}'s {fam.published_prefix.format(layer='{i}')}")
        return fam
    for fam in families.all_families():
        if fam.published_prefix and any(_published_pattern(fam.published_prefix).match(k) for k in keys):
            return fam
    raise ModelFamilyError(f"{path}: no model family's published eraser keys (keys like "
                           f"{keys[0] if keys else None!r}); pass the base model to check them against")


def _load_published(folder: Path, d: dict, model) -> tuple[EraserConfig, dict]:
    cfg_path = folder / CONFIG_NAME
    if d.get("eraser_type") != "adapter":
        raise UnlearnError(f"{cfg_path}: eraser_type {d.get('eraser_type')!r}: the T2VUnlearning format holds "
                           "adapter erasers only")
    cfg = _config_from_json(d, cfg_path)
    st, pt = folder / PUBLISHED_SAFETENSORS, folder / PUBLISHED_PT
    if st.exists() and pt.exists():
        _check_published_pair(st, pt)
    if st.exists():
        reader, path = SafetensorsReader(folder, prefer=PUBLISHED_SAFETENSORS), st
    elif pt.exists():
        reader, path = _ArrayReader(_torch_load_published(pt)), pt
    else:
        raise UnlearnError(f"{folder}: no eraser weights ({PUBLISHED_PT} or {PUBLISHED_SAFETENSORS}) beside "
                           f"{CONFIG_NAME}")
    try:
        keys = reader.keys()
        fam = _published_family(keys, path, model)
        pattern = _published_pattern(fam.published_prefix)
        layers = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        probe = fam.published_prefix.format(layer=0) + ".down.weight"
        if probe in keys and len(reader.shape(probe)) == 2:
            found_rank, found_dim = reader.shape(probe)
            if model is None:
                model_layers, model_dim = max(layers) + 1, found_dim
            else:
                site = site_for(model)
                model_layers, model_dim = site.num_layers, site.dim
            _fit_model(path, max(layers) + 1, found_dim, model_layers, model_dim)
            _fit_rank(path, cfg.rank, found_rank)
        elif model is None:
            raise ConversionError(f"{path}: no {probe} tensor (not a T2VUnlearning {fam.title} eraser?)")
        else:
            site = site_for(model)
            model_layers, model_dim = site.num_layers, site.dim
    except BaseException:
        reader.close()
        raise
    L, D, r = model_layers, model_dim, cfg.rank
    shapes = {"down.kernel": (L, D, r), "down.bias": (L, r), "up.kernel": (L, r, D), "up.bias": (L, D)}
    flat = _load_flat(reader, shapes, str(path), "T2VUnlearning eraser", L, published_rule_table(fam.published_prefix, L))
    return cfg, unflatten_phi(cfg, flat)


def is_eraser_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).exists()
