"""Load and save transformers of every model family: diffusers folders (safetensors) and our orbax checkpoints.

`load_transformer(path)` accepts a diffusers transformer folder, a pipeline folder (its
`transformer/` is used; the family may read more: Wan 2.2 A14B's `transformer_2/` too, returning
both experts as one model) or a folder written by `save_orbax` (fast repeated loads). The family is
found from the folder (`families.of_transformer_folder`); tensors are streamed one at a time
straight into their target shardings by the family's rule table (`conversion.load_into`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from unlearn_jax import families
from unlearn_jax.atomic import atomic_dir
from unlearn_jax.conversion import (SafetensorsReader, load_into, module_targets, param_leaves, refuse_non_floating,
                                    write_module)
from unlearn_jax.dtypes import as_dtype
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.families import ORBAX_MARKER
from unlearn_jax.parallel import DEFAULT_RULES

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

__all__ = ["ORBAX_MARKER", "WEIGHTS_NAME", "as_dtype", "load_transformer", "param_leaves", "resolve_transformer_dir",
           "save_orbax", "save_transformer"]


def resolve_transformer_dir(path: str | os.PathLike) -> Path:
    """The folder holding the transformer: `path` itself, or `path/transformer` for a pipeline."""
    path = Path(path)
    if not path.exists():
        raise UnlearnError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise UnlearnError(f"{path}: expected a folder (a diffusers transformer or pipeline folder)")
    if (path / ORBAX_MARKER).exists() or (path / "config.json").exists():
        return path
    if (path / "transformer").is_dir():
        return path / "transformer"
    if (path / "model_index.json").exists():
        raise ModelFamilyError(f"{path}: a pipeline folder without a transformer/ subfolder")
    raise UnlearnError(f"{path}: neither a diffusers transformer folder (config.json + safetensors) "
                       f"nor a pipeline folder with transformer/")


def _runtime_for(dtype, leaves_dtype, mesh, rules, runtime: dict) -> dict:
    rt = dict(runtime)
    compute = dtype if dtype is not None else leaves_dtype
    if rt.get("compute_dtype") is not None:
        compute = as_dtype(rt["compute_dtype"], "compute_dtype")
    rt.pop("compute_dtype", None)
    rt.setdefault("dtype", compute)
    rt.setdefault("param_dtype", compute)
    if mesh is not None:
        rt.setdefault("mesh", mesh)
        rt.setdefault("rules", tuple(rules))
    return rt


def load_transformer(path, dtype=None, mesh=None, rules=None, erasers=None, progress: bool = False, **runtime):
    """Reads a transformer of any supported family; returns a model called like diffusers' forward.

    dtype: None keeps the checkpoint's dtype (params and compute); "float32"/"bfloat16"/... casts.
    compute_dtype (keyword): compute in another dtype than the parameters are stored in.
    mesh: a `jax.sharding.Mesh` to shard the parameters over (by `rules`, logical -> mesh axes).
    erasers: a folder of trained erasers (ours or the published T2VUnlearning format) to attach.
    runtime: `attention=`, `remat=`, `param_dtype=` ... (the family model's `Runtime`).
    """
    path = Path(path)
    folder = resolve_transformer_dir(path)
    family = families.of_transformer_folder(folder)
    dtype = as_dtype(dtype)
    rules = tuple(rules if rules is not None else DEFAULT_RULES)

    def load_one(sub):
        return _load_folder(resolve_transformer_dir(sub), dtype, mesh, rules, progress, runtime)

    # a pipeline folder: its family says which transformer folders make its model
    model = load_one(folder) if folder == path else family.load_pipeline_transformer(path, load_one)
    if erasers is not None:
        from unlearn_jax.erased_model import attach_erasers

        model = attach_erasers(model, erasers)
    return model


def _load_folder(folder: Path, dtype, mesh, rules, progress: bool, runtime: dict):
    """One transformer folder (diffusers or our orbax checkpoint) of any family."""
    family = families.of_transformer_folder(folder)
    if (folder / ORBAX_MARKER).exists():
        return _load_orbax(folder, family, dtype, mesh, rules, runtime)
    from unlearn_jax.jsonfiles import read_json_object

    cfg = family.transformer_config(read_json_object(folder / "config.json", "transformer config"),
                                    str(folder / "config.json"))
    reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
    try:
        first = reader.dtype(reader.keys()[0])
        leaves_dtype = np.dtype(np.float32) if first == np.float64 else first
        model_abs = family.abstract_transformer(cfg, **_runtime_for(dtype, leaves_dtype, mesh, rules, runtime))
        return load_into(model_abs, reader, family.transformer_rules(cfg), str(folder), dtype=dtype, mesh=mesh,
                         rules=rules, progress=progress)
    finally:
        reader.close()


def _parts(model) -> dict | None:
    """A model made of several diffusers transformers (Wan 2.2 A14B's experts): component name -> part."""
    model = getattr(model, "base", model)
    return model.experts() if hasattr(model, "experts") else None


def save_transformer(model, path, dtype=None, max_shard_size: int = 10 * 2**30, *, overwrite: bool = False,
                     root=None):
    """Writes a diffusers transformer folder that the family's diffusers class `from_pretrained` loads.

    A model of several transformers (Wan 2.2 A14B's two experts) is written as one sub-folder per
    component (`transformer/`, `transformer_2/`, each loading with `from_pretrained(path, subfolder=...)`)
    plus a model_index.json naming them and the boundary, so `load_transformer(path)` reads both back.
    dtype: None writes each tensor in the model's parameter dtype. Written to a temporary folder
    and renamed when complete. overwrite: replace an earlier output of unlearn-jax at `path`
    (never anything else: `atomic.atomic_dir`); root: `path` must lie inside it.
    """
    parts = _parts(model)
    with atomic_dir(path, overwrite, root=root) as tmp:
        if parts is None:
            _write_transformer(tmp, model, dtype, max_shard_size)
        else:
            for name, part in parts.items():
                (tmp / name).mkdir()
                _write_transformer(tmp / name, part, dtype, max_shard_size)
            _write_index(tmp, model.config)
    return Path(path)


def _write_transformer(folder: Path, model, dtype, max_shard_size: int):
    family = families.of_model(model)
    config = model.config.to_dict()
    config["_diffusers_version"] = _diffusers_version()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_module(folder, model, family.transformer_rules(model.config), WEIGHTS_NAME, dtype=as_dtype(dtype),
                 max_shard_size=max_shard_size)


def _write_index(folder: Path, cfg):
    """model_index.json of a folder of several transformers; the scheduler's num_train_timesteps only where it
    is not diffusers' default 1000 (the boundary's scale)."""
    (folder / "model_index.json").write_text(json.dumps(cfg.pipeline_index(_diffusers_version()), indent=2) + "\n")
    if cfg.num_train_timesteps != 1000:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"num_train_timesteps": cfg.num_train_timesteps}, indent=2) + "\n")


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is optional: the folder layout does not depend on it
        return "0.32.0"


# --------------------------------------------------------------------------------------------
# Orbax checkpoints of converted weights (fast repeated loads, restored straight into shardings)
# --------------------------------------------------------------------------------------------
def save_orbax(model, path, *, overwrite: bool = False):
    import orbax.checkpoint as ocp

    if _parts(model) is not None:
        raise UnlearnError(f"{path}: a model of several transformers ({', '.join(_parts(model))}); save each one "
                           "with save_orbax(part, ...) (model.experts()), or the whole with save_transformer")
    family = families.of_model(model)
    leaves = param_leaves(model)
    with atomic_dir(path, overwrite) as tmp:
        meta = {"format": "unlearn-jax transformer", "family": family.transformer_class,
                "config": model.config.to_dict(), "dtypes": {k: str(v.dtype) for k, v in leaves.items()}}
        (tmp / ORBAX_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), leaves)
            ckptr.wait_until_finished()
    return Path(path)


def _load_orbax(folder: Path, family, dtype, mesh, rules, runtime):
    import orbax.checkpoint as ocp

    from unlearn_jax.conversion import assemble
    from unlearn_jax.jsonfiles import read_json_object

    meta = read_json_object(folder / ORBAX_MARKER, "unlearn-jax checkpoint description")
    cfg = family.transformer_config(meta.get("config", {}), str(folder / ORBAX_MARKER))
    stored = {k: np.dtype(v) for k, v in meta["dtypes"].items()}
    refuse_non_floating(stored, str(folder))
    leaves_dtype = next(iter(stored.values()))
    model_abs = family.abstract_transformer(cfg, **_runtime_for(dtype, leaves_dtype, mesh, rules, runtime))
    targets = module_targets(model_abs, dtype=dtype, mesh=mesh, rules=rules)
    missing = sorted(set(targets) - set(stored))
    extra = sorted(set(stored) - set(targets))
    if missing or extra:
        raise UnlearnError(f"{folder}: checkpoint does not fit the model: missing {missing}, unexpected {extra}")
    abstract = {}
    for k, t in targets.items():
        sharding = t.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract[k] = jax.ShapeDtypeStruct(t.shape, t.dtype or stored[k], sharding=sharding)
    with ocp.StandardCheckpointer() as ckptr:
        leaves = ckptr.restore((folder / "params").absolute(), abstract)
    return assemble(model_abs, leaves)
