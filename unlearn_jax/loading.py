"""Load and save CogVideoX transformers: diffusers folders (safetensors) and our orbax checkpoints.

`load_transformer(path)` accepts a diffusers transformer folder, a pipeline folder (its
`transformer/` is used) or a folder written by `save_orbax` (fast repeated loads). Tensors are
streamed one at a time straight into their target shardings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.atomic import atomic_dir
from unlearn_jax.conversion import SafetensorsReader, Target, iter_torch_tensors, load_params, write_safetensors
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.models.cogvideox import CLASS_NAME, CogVideoXConfig, CogVideoXTransformer, abstract_model, rule_table
from unlearn_jax.parallel import DEFAULT_RULES, named_sharding

ORBAX_MARKER = "unlearn_jax_checkpoint.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UnlearnError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return np.dtype(dtype)


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


def _flat_targets(model_abs, mesh, rules, dtype) -> dict[str, Target]:
    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(model_abs, nnx.Param)):
        key = ".".join(map(str, path))
        shape = tuple(var.shape)
        sharding = None
        if mesh is not None:
            sharding = named_sharding(var.get_metadata().get("out_sharding"), shape, mesh, rules)
        targets[key] = Target(shape, dtype, sharding)
    return targets


def _assemble(model_abs, leaves: Mapping[str, jax.Array]) -> CogVideoXTransformer:
    graphdef, state = nnx.split(model_abs)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        flat.append((path, var.replace(leaves[key]) if key in leaves else var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _runtime_for(dtype, leaves_dtype, mesh, rules, runtime: dict) -> dict:
    rt = dict(runtime)
    compute = dtype if dtype is not None else leaves_dtype
    if rt.get("compute_dtype") is not None:
        compute = as_dtype(rt["compute_dtype"])
    rt.pop("compute_dtype", None)
    rt.setdefault("dtype", compute)
    rt.setdefault("param_dtype", compute)
    if mesh is not None:
        rt.setdefault("mesh", mesh)
        rt.setdefault("rules", tuple(rules))
    return rt


def load_transformer(path, dtype=None, mesh=None, rules=None, erasers=None, progress: bool = False,
                     **runtime) -> CogVideoXTransformer:
    """Reads a CogVideoX transformer; returns a model called like diffusers' forward.

    dtype: None keeps the checkpoint's dtype (params and compute); "float32"/"bfloat16"/... casts.
    compute_dtype (keyword): compute in another dtype than the parameters are stored in.
    mesh: a `jax.sharding.Mesh` to shard the parameters over (by `rules`, logical -> mesh axes).
    erasers: a folder of trained erasers (ours or the published T2VUnlearning format) to attach.
    runtime: `attention=`, `remat=`, `param_dtype=` ... (see `cogvideox.Runtime`).
    """
    folder = resolve_transformer_dir(path)
    dtype = as_dtype(dtype)
    rules = tuple(rules if rules is not None else DEFAULT_RULES)
    if (folder / ORBAX_MARKER).exists():
        model = _load_orbax(folder, dtype, mesh, rules, runtime)
    else:
        cfg = CogVideoXConfig.from_json(folder / "config.json")
        reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
        try:
            first = reader.dtype(reader.keys()[0])
            leaves_dtype = np.dtype(np.float32) if first == np.float64 else first
            model_abs = abstract_model(cfg, **_runtime_for(dtype, leaves_dtype, mesh, rules, runtime))
            leaves = load_params(reader, rule_table(cfg), _flat_targets(model_abs, mesh, rules, dtype), str(folder),
                                 progress=progress)
        finally:
            reader.close()
        model = _assemble(model_abs, leaves)
    if erasers is not None:
        from unlearn_jax.erasers import attach_erasers

        model = attach_erasers(model, erasers)
    return model


def param_leaves(model) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_transformer(model: CogVideoXTransformer, path, dtype=None, max_shard_size: int = 10 * 2**30):
    """Writes a diffusers transformer folder that `CogVideoXTransformer3DModel.from_pretrained` loads.

    dtype: None writes each tensor in the model's parameter dtype. Written to a temporary folder
    and renamed when complete.
    """
    cfg: CogVideoXConfig = model.config
    table = rule_table(cfg)
    leaves = {k: v for k, v in param_leaves(model).items() if k in {r.jax for r in table.rules}}
    dtype = as_dtype(dtype)
    specs, tensors = iter_torch_tensors(table, leaves)
    if dtype is not None:
        specs = {k: (s, dtype) for k, (s, _) in specs.items()}
        tensors = ((k, a.astype(dtype)) for k, a in tensors)
    with atomic_dir(path) as tmp:
        config = cfg.to_dict()
        config["_diffusers_version"] = _diffusers_version()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards = _split_shards(specs, max_shard_size)
        if len(shards) == 1:
            write_safetensors(tmp / WEIGHTS_NAME, tensors, specs)
        else:
            weight_map, total = {}, 0
            names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for name, keys in zip(names, shards):
                sub = {k: specs[k] for k in keys}
                write_safetensors(tmp / name, (next(tensors) for _ in keys), sub)
                weight_map.update({k: name for k in keys})
                total += sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in sub.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(path)


def _split_shards(specs, max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k, (shape, dt) in specs.items():
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is optional: the folder layout does not depend on it
        return "0.32.0"


# --------------------------------------------------------------------------------------------
# Orbax checkpoints of converted weights (fast repeated loads, restored straight into shardings)
# --------------------------------------------------------------------------------------------
def save_orbax(model: CogVideoXTransformer, path):
    import orbax.checkpoint as ocp

    leaves = param_leaves(model)
    with atomic_dir(path) as tmp:
        meta = {"format": "unlearn-jax transformer", "family": CLASS_NAME, "config": model.config.to_dict(),
                "dtypes": {k: str(v.dtype) for k, v in leaves.items()}}
        (tmp / ORBAX_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), leaves)
            ckptr.wait_until_finished()
    return Path(path)


def _load_orbax(folder: Path, dtype, mesh, rules, runtime) -> CogVideoXTransformer:
    import orbax.checkpoint as ocp

    meta = json.loads((folder / ORBAX_MARKER).read_text())
    if meta.get("family") != CLASS_NAME:
        raise ModelFamilyError(f"{folder}: an unlearn-jax checkpoint of {meta.get('family')}, not {CLASS_NAME}")
    cfg = CogVideoXConfig.from_dict(meta["config"], str(folder / ORBAX_MARKER))
    stored = {k: np.dtype(v) for k, v in meta["dtypes"].items()}
    leaves_dtype = next(iter(stored.values()))
    model_abs = abstract_model(cfg, **_runtime_for(dtype, leaves_dtype, mesh, rules, runtime))
    targets = _flat_targets(model_abs, mesh, rules, dtype)
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
    return _assemble(model_abs, leaves)
