"""Exports of trained erasers to the PyTorch world: the published T2VUnlearning folder, a diffusers
LoRA file, a merged diffusers transformer folder (`jax_to_diffusers.py --format ...`).

Every export takes the base model (or its transformer config): the family's `EraserSite` names
the keys. Each is written under a temporary name and renamed when complete.

A model of several experts (Wan 2.2 A14B, `erasers.expert_rows`) is exported per expert, each
expert's rows in the layout a stock pipeline reads for that component: the published format as one
folder per expert (`transformer/`, `transformer_2/`), LoRA as one file per expert
(`eraser_io.expert_lora_weights`), merged weights as `transformer/` + `transformer_2/`; a README.md
says how a stock `WanPipeline` loads them.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from unlearn_jax.atomic import atomic_dir
from unlearn_jax.conversion import iter_torch_tensors, write_safetensors
from unlearn_jax.dtypes import as_dtype
from unlearn_jax.eraser_io import (CONFIG_NAME, LORA_WEIGHTS, PUBLISHED_PT, PUBLISHED_SAFETENSORS, README_NAME, _host,
                                   expert_lora_weights, flatten_phi, lora_rule_table, published_rule_table, site_for)
from unlearn_jax.erasers import EraserConfig, expert_rows, merge_erasers, take_layers
from unlearn_jax.errors import UnlearnError

FORMATS = ("diffusers", "t2vunlearning", "lora")

__all__ = ["FORMATS", "export", "export_lora", "export_merged", "export_t2vunlearning"]


def export_merged(folder, base_model, cfg: EraserConfig, phi: Mapping, dtype=None, *, overwrite: bool = False,
                  root=None) -> Path:
    """A plain diffusers transformer folder (lora / attn / full erasers folded into the weights) that
    the family's diffusers class `from_pretrained` loads as is (several experts: one sub-folder each,
    `from_pretrained(folder, subfolder="transformer_2")`)."""
    from unlearn_jax.loading import save_transformer

    return save_transformer(merge_erasers(base_model, cfg, phi), folder, dtype=dtype, overwrite=overwrite, root=root)


def _cast(arr: np.ndarray, dtype) -> np.ndarray:
    return arr if dtype is None else arr.astype(as_dtype(dtype))


def _published_tensors(cfg: EraserConfig, phi: Mapping, model, dtype=None) -> dict[str, np.ndarray]:
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
    _, gen = iter_torch_tensors(published_rule_table(site_for(model).published_prefix, L), leaves)
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


def export_t2vunlearning(folder, cfg: EraserConfig, phi: Mapping, model, dtype=None, readme: bool = False, *,
                         overwrite: bool = False, root=None) -> Path:
    """The published T2VUnlearning eraser folder: `eraser_config.json` + `eraser_weights.pt` (a torch.save'd
    dict of per-block state dicts) + the same tensors as `eraser_weights.safetensors`. Adapter kind only.

    model: the base model or its transformer config (the family's published keys).
    dtype: write the tensors in this dtype (default fp32). readme: add a README.md on how to load it.
    Needs PyTorch (to write the .pt file).
    """
    parts = expert_rows(model)
    if parts is None:
        tensors = {None: _published_tensors(cfg, phi, model, dtype)}
    else:  # one published folder per expert, each with its own rows numbered from 0
        tensors = {name: _published_tensors(cfg, take_layers(phi, rows), part, dtype) for name, part, rows in parts}
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UnlearnError("writing eraser_weights.pt needs PyTorch (pip install 'unlearn-jax[torch]')") from None
    with atomic_dir(folder, overwrite, root=root) as tmp:
        for name, t in tensors.items():
            sub = tmp if name is None else tmp / name
            sub.mkdir(exist_ok=True)
            _write_published(sub, cfg, t)
        if readme:
            text = _ADAPTER_README if parts is None else _EXPERTS_ADAPTER_README
            (tmp / README_NAME).write_text(text.format(rank=cfg.rank))
    return Path(folder)


_ADAPTER_README = """\
# Concept eraser (T2VUnlearning adapter format)

Adapters on each block's attention output; a stock diffusers pipeline runs them with:

    import unlearn_jax.torch; unlearn_jax.torch.attach_erasers(pipe.transformer, "THIS_FOLDER")

The folder also loads in the T2VUnlearning authors' inference scripts (eraser_config.json + eraser_weights.pt):
their `test_cogvideo.py` takes `--eraser_path THIS_FOLDER --eraser_rank {rank}` (the rank of these erasers; the
scripts assume 128 otherwise). In JAX: `unlearn_jax.load_transformer(BASE, erasers="THIS_FOLDER")`.
eraser_weights.safetensors holds the same tensors; the readers of this project check that the two agree.
"""

_EXPERTS_ADAPTER_README = """\
# Concept erasers of a two-expert model (T2VUnlearning adapter format, one folder per expert)

transformer/ holds the high-noise expert's adapters (WanPipeline's `transformer`), transformer_2/ the low-noise
expert's (`transformer_2`); each is a published eraser folder (eraser_config.json + eraser_weights.pt, rank {rank}).
A stock diffusers pipeline runs both with:

    import unlearn_jax.torch; unlearn_jax.torch.attach_erasers(pipe, "THIS_FOLDER")

or one expert at a time: `attach_erasers(pipe.transformer, "THIS_FOLDER/transformer")`,
`attach_erasers(pipe.transformer_2, "THIS_FOLDER/transformer_2")`. In JAX:
`unlearn_jax.load_transformer(PIPELINE, erasers="THIS_FOLDER")`.
"""

_LORA_README = """\
# Concept eraser (LoRA)

    pipe.load_lora_weights("THIS_FOLDER")   # a diffusers pipeline of the base model (needs `peft`)
"""

_EXPERTS_LORA_README = """\
# Concept erasers of a two-expert model (LoRA, one file per expert)

{high} holds the high-noise expert's LoRA (WanPipeline's `transformer`), {low} the low-noise expert's
(`transformer_2`). A stock diffusers pipeline of the base model (needs `peft`) loads both with:

    pipe.load_lora_weights("THIS_FOLDER", weight_name="{high}")
    pipe.load_lora_weights("THIS_FOLDER", weight_name="{low}", load_into_transformer_2=True)
"""


def export_lora(folder, cfg: EraserConfig, phi: Mapping, model, dtype=None, readme: bool = False, *,
                overwrite: bool = False, root=None) -> Path:
    """LoRA erasers as `pytorch_lora_weights.safetensors` that the pipeline's `load_lora_weights` (or
    `transformer.load_lora_adapter`) reads. The eraser scale is folded into `lora_B`, so the loaded model
    (PEFT's default alpha = rank, scaling 1) equals ours."""
    if cfg.kind != "lora":
        raise UnlearnError(f"--format lora exports LoRA erasers; these are {cfg.kind!r} erasers "
                           + ("(use --format t2vunlearning)" if cfg.kind == "adapter"
                              else "(use --format diffusers --base BASE for merged weights)"))
    parts = expert_rows(model)
    with atomic_dir(folder, overwrite, root=root) as tmp:
        if parts is None:
            _write_lora(tmp / LORA_WEIGHTS, cfg, phi, model, dtype)
        else:  # one file per expert, each read by load_lora_weights into its component
            for name, part, rows in parts:
                _write_lora(tmp / expert_lora_weights(name), cfg, take_layers(phi, rows), part, dtype)
        if readme:
            (tmp / README_NAME).write_text(_LORA_README if parts is None else _EXPERTS_LORA_README.format(
                high=expert_lora_weights(parts[0][0]), low=expert_lora_weights(parts[1][0])))
    return Path(folder)


def _write_lora(path: Path, cfg: EraserConfig, phi: Mapping, model, dtype):
    leaves = {}
    for name, ab in phi.items():
        leaves[f"{name}.a"] = _host(ab["a"]).astype(np.float32, copy=False)
        leaves[f"{name}.b"] = _host(ab["b"]).astype(np.float32, copy=False) * np.float32(cfg.scale)
    table = lora_rule_table([t for t in cfg.lora_targets if t in phi], site_for(model))
    specs, gen = iter_torch_tensors(table, leaves)
    if dtype is not None:
        dt = as_dtype(dtype)
        specs = {k: (s, dt) for k, (s, _) in specs.items()}
        gen = ((k, a.astype(dt)) for k, a in gen)
    write_safetensors(path, gen, specs)


def export(folder, fmt: str, cfg: EraserConfig, phi: Mapping, model, base_model=None, dtype=None, *,
           overwrite: bool = False, root=None) -> Path:
    """The exports of `jax_to_diffusers.py` for erasers: fmt in diffusers | t2vunlearning | lora.

    model: the base model or its transformer config (names the keys).
    diffusers: lora / attn / full -> a merged transformer folder (needs the loaded `base_model`); adapter ->
    the eraser folder that `unlearn_jax.torch.attach_erasers` reads (a stock diffusers folder cannot hold
    an adapter).
    """
    kw = dict(overwrite=overwrite, root=root)
    if fmt == "t2vunlearning":
        return export_t2vunlearning(folder, cfg, phi, model, dtype=dtype, **kw)
    if fmt == "lora":
        return export_lora(folder, cfg, phi, model, dtype=dtype, readme=True, **kw)
    if fmt != "diffusers":
        raise UnlearnError(f"format {fmt!r}: choose diffusers, t2vunlearning or lora")
    if cfg.kind == "adapter":
        return export_t2vunlearning(folder, cfg, phi, model, dtype=dtype, readme=True, **kw)
    if base_model is None:
        raise UnlearnError(f"--format diffusers for {cfg.kind} erasers writes the merged model: give the base "
                           "model with --base BASE_MODEL_DIR (the diffusers folder the erasers were trained on)")
    return export_merged(folder, base_model, cfg, phi, dtype=dtype, **kw)
