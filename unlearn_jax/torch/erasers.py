"""Erasers in a stock diffusers transformer of any supported family, without a fork of diffusers.

The family's `EraserSite` says where they go. Adapter erasers (docs/METHOD.md §1) become a child
module `adapter` of each block's site attention (CogVideoX: `attn1`, so the transformer's state dict
names them exactly as the published T2VUnlearning files do,
`transformer_blocks.{i}.attn1.adapter.down.weight` ...) and a forward hook on that attention that
adds `scale * up(gelu(down(a)))` to the video part `a` of its output (CogVideoX: the first of
`(video, text)`). LoRA erasers become a child `eraser_lora` of each targeted projection plus a hook
adding `scale * B(A(x))`. Nothing of the base model is changed: `detach_erasers` removes the hooks
and the children.

Reads our eraser folders (`eraser_config.json` + `erasers.safetensors`) and the published format
(`eraser_config.json` + `eraser_weights.pt`, or the same tensors as `eraser_weights.safetensors`);
`.pt` files only with `torch.load(..., weights_only=True)`. Never imports JAX.

A pipeline with several experts (Wan 2.2 A14B's `transformer` and `transformer_2`) takes erasers for
all of them at once: our folder (its `experts` field; the rows of each expert in order) or a folder
holding one eraser folder per expert (`transformer/`, `transformer_2/`, as our published-format export
writes); each expert gets its own rows. `detach_erasers(pipe)` removes them from every expert.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_jax import families
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.families.base import EraserSite

CONFIG_NAME = "eraser_config.json"
WEIGHTS_NAME = "erasers.safetensors"
PUBLISHED_PT = "eraser_weights.pt"
PUBLISHED_SAFETENSORS = "eraser_weights.safetensors"
FORMAT = "unlearn-jax"
_STATE = "_unlearn_jax_erasers"
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


class AdapterEraser(nn.Module):
    """T2VUnlearning's adapter: `up(gelu(down(a)))` (exact GELU), added to the attention output times `scale`."""

    def __init__(self, dim: int, rank: int, scale: float = 1.0, output: str = "tuple_first"):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.scale = float(scale)
        self.output = output  # how the attention returns the video tokens (EraserSite.torch_output)

    def forward(self, a):
        return self.up(F.gelu(self.down(a)))


class LoRAEraser(nn.Module):
    """Low-rank delta of a projection: `scale * lora_B(lora_A(x))` added to the projection's output."""

    def __init__(self, din: int, dout: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.lora_A = nn.Linear(din, rank, bias=False)
        self.lora_B = nn.Linear(rank, dout, bias=False)
        self.scale = float(scale)

    def forward(self, x):
        return self.lora_B(self.lora_A(x))


def _adapter_hook(attn, inputs, output):
    eraser = attn.adapter
    if eraser.scale == 0.0:
        return output
    if eraser.output == "tensor":  # the attention returns the video tokens alone
        return output + eraser.scale * eraser(output)
    if not isinstance(output, tuple) or len(output) != 2:
        raise UnlearnError("the attention did not return (video, text) hidden states: not the joint attention "
                           "the erasers were made for")
    video, text = output
    return video + eraser.scale * eraser(video), text


def _lora_hook(linear, inputs, output):
    eraser = linear.eraser_lora
    if eraser.scale == 0.0:
        return output
    return output + eraser.scale * eraser(inputs[0])


# --------------------------------------------------------------------------------------------
# Reading eraser folders (torch tensors, diffusers layout)
# --------------------------------------------------------------------------------------------
def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else (text or type(e).__name__)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError / OSError on corrupt or truncated files
        raise UnlearnError(f"{path}: not a readable safetensors file (corrupt or truncated?): {_one_line(e)}") from None


def _load_pt(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects other than tensors and dicts" if "global" in str(e).lower()
               else "it is not a torch.save file of tensors (corrupt or truncated?)")
        raise UnlearnError(f"{path}: refused by torch.load(weights_only=True): {why}; eraser .pt files are never "
                           "unpickled beyond plain tensors (ask for a safetensors file)") from None
    except Exception as e:
        raise UnlearnError(f"{path}: not a readable PyTorch file (corrupt or truncated?): "
                           f"{type(e).__name__}: {_one_line(e, 120)}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise UnlearnError(f"{path}: expected a dict of per-block state dicts (the T2VUnlearning layout)")
    return obj


def read_eraser_folder(folder, site: EraserSite) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, per-module state dicts in PyTorch layout) of an eraser folder, named for `site`.

    Adapter modules are named `<site.published_prefix>` (CogVideoX: `transformer_blocks.{i}.attn1.adapter`;
    keys down/up .weight/.bias); LoRA modules `<site.lora_module(t)>.eraser_lora` (lora_A/lora_B .weight).
    config: eraser_type, eraser_rank, scale, num_layers (may be None), dim (may be None).
    """
    folder = Path(folder)
    if folder.is_file() and (folder.parent / CONFIG_NAME).exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UnlearnError(f"{folder}: no such eraser folder")
    cfg_path = folder / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UnlearnError(f"{cfg_path}: not a readable eraser config ({_one_line(e)})") from None
    if not isinstance(raw, dict) or "eraser_type" not in raw:
        raise UnlearnError(f"{cfg_path}: not an eraser config (no 'eraser_type' key)")
    kind, rank = raw.get("eraser_type"), raw.get("eraser_rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UnlearnError(f"{cfg_path}: eraser_rank must be a positive integer, got {rank!r}")
    cfg = {"eraser_type": kind, "eraser_rank": rank, "scale": float(raw.get("scale", 1.0)),
           "num_layers": raw.get("num_layers"), "dim": raw.get("dim"),
           "lora_targets": list(raw.get("lora_targets") or _LORA_TARGETS)}
    if kind in ("attn", "full"):
        raise UnlearnError(f"{cfg_path}: {kind} erasers replace base weights; export a merged model with "
                           "`jax_to_diffusers.py ERASERS OUT --format diffusers --base BASE` and load it with "
                           "the transformer class's from_pretrained")
    if kind not in ("adapter", "lora"):
        raise UnlearnError(f"{cfg_path}: eraser_type {kind!r} is not adapter or lora")

    if raw.get("format") == FORMAT:
        path = folder / WEIGHTS_NAME
        if not path.exists():
            raise UnlearnError(f"{folder}: {WEIGHTS_NAME} is missing")
        flat = _load_safetensors(path)
        return cfg, _from_jax_layout(kind, flat, path, cfg["lora_targets"], site)
    if kind != "adapter":
        raise UnlearnError(f"{cfg_path}: eraser_type {kind!r}: the T2VUnlearning format holds adapter erasers only")
    st, pt = folder / PUBLISHED_SAFETENSORS, folder / PUBLISHED_PT
    if st.exists():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in _load_safetensors(st).items():
            module, _, param = key.partition(".adapter.")
            modules.setdefault(module + ".adapter", {})[param] = t
        if pt.exists():  # both: they must agree (a replaced .pt is never silently ignored)
            other = _load_pt(pt)
            same = set(other) == set(modules) and all(
                set(other[m]) == set(modules[m]) and all(torch.equal(other[m][k].float(), modules[m][k].float())
                                                          for k in modules[m]) for m in modules)
            if not same:
                raise UnlearnError(f"{folder}: {PUBLISHED_PT} and {PUBLISHED_SAFETENSORS} hold different erasers; "
                                   "delete the one that is stale")
    elif pt.exists():
        modules = _load_pt(pt)
    else:
        raise UnlearnError(f"{folder}: no eraser weights ({PUBLISHED_PT} or {PUBLISHED_SAFETENSORS})")
    return cfg, modules


def _from_jax_layout(kind: str, flat: dict[str, torch.Tensor], path: Path, targets, site: EraserSite) -> dict:
    """Our stacked (layer, in, out) tensors -> per-block PyTorch (out, in) state dicts."""
    def need(key, ndim):
        if key not in flat or flat[key].ndim != ndim:
            raise ConversionError(f"{path}: tensor {key} missing or not {ndim}-D (found {sorted(flat)[:8]})")
        return flat[key]

    out = {}
    if kind == "adapter":
        dk, db, uk, ub = need("down.kernel", 3), need("down.bias", 2), need("up.kernel", 3), need("up.bias", 2)
        for i in range(dk.shape[0]):
            out[site.published_prefix.format(layer=i)] = {
                "down.weight": dk[i].T.contiguous(), "down.bias": db[i], "up.weight": uk[i].T.contiguous(),
                "up.bias": ub[i]}
        return out
    for t in targets:
        if t not in site.torch_lora_modules:
            raise ConversionError(f"{path}: unknown LoRA target {t!r}")
        a, b = need(f"{t}.a", 3), need(f"{t}.b", 3)
        for i in range(a.shape[0]):
            out[f"{site.lora_module(t).format(layer=i)}.eraser_lora"] = {
                "lora_A.weight": a[i].T.contiguous(), "lora_B.weight": b[i].T.contiguous()}
    return out


# --------------------------------------------------------------------------------------------
# Attaching
# --------------------------------------------------------------------------------------------
def _family_of(obj):
    """The family of a diffusers transformer (by its class name), or None."""
    for fam in families.all_families():
        if type(obj).__name__ == fam.transformer_class:
            return fam
    return None


EXPERT_COMPONENTS = ("transformer", "transformer_2")  # a pipeline's experts, in eraser-row order


def _transformer_of(obj):
    """(transformer, its family) of a diffusers transformer or a pipeline holding one."""
    fam = _family_of(obj)
    if fam is not None:
        return obj, fam
    inner = getattr(obj, "transformer", None)
    if inner is not None and _family_of(inner) is not None:
        return inner, _family_of(inner)  # a pipeline
    raise ModelFamilyError(f"{type(obj).__name__}: not the transformer of a supported family "
                           f"({families.REGISTRY.supported()}) nor a pipeline holding one")


def _transformers_of(obj) -> dict:
    """Component name -> transformer: every expert of a pipeline that has several (a `transformer_2` that is
    not None), else {"transformer": the one transformer}."""
    first, _ = _transformer_of(obj)
    if first is obj:
        return {"transformer": obj}
    out = {}
    for name in EXPERT_COMPONENTS:
        inner = getattr(obj, name, None)
        if inner is not None and _family_of(inner) is not None:
            out[name] = inner
    return out


def _expert_layout(eraser_dir) -> list[tuple[str, int]] | None:
    """[(component, rows)] of our eraser folder for several experts (its `experts` field), else None."""
    path = Path(eraser_dir)
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None  # read_eraser_folder says what is wrong with it
    names, rows = (raw.get("experts"), raw.get("expert_layers")) if isinstance(raw, dict) else (None, None)
    if not names:
        return None
    if not isinstance(rows, list) or len(rows) != len(names):
        raise UnlearnError(f"{path / CONFIG_NAME}: experts {names} without expert_layers (the rows of each)")
    return list(zip(names, rows))


def _per_expert_folders(eraser_dir) -> list[str] | None:
    """The components of a folder holding one eraser folder per expert (none of its own), else None."""
    path = Path(eraser_dir)
    if not path.is_dir() or (path / CONFIG_NAME).exists():
        return None
    found = [n for n in EXPERT_COMPONENTS if (path / n / CONFIG_NAME).is_file()]
    return found or None


def _expert_modules(modules: dict, site: EraserSite, start: int, rows: int) -> dict:
    """The modules of rows [start, start + rows) of a stacked folder, renumbered from 0 for one expert."""
    key = re.compile(rf"^{re.escape(site.torch_blocks)}\.(\d+)\.")
    out = {}
    for name, sd in modules.items():
        m = key.match(name)
        i = int(m.group(1)) if m else -1
        if start <= i < start + rows:
            out[f"{site.torch_blocks}.{i - start}.{name[m.end():]}"] = sd
    return out


def attach_erasers(transformer, eraser_dir, scale: float | None = None):
    """Makes a stock diffusers transformer (or a pipeline's) run the erased model.

    eraser_dir: an unlearn-jax eraser folder (adapter or LoRA erasers) or a published T2VUnlearning one;
    for a pipeline with several experts (Wan 2.2 A14B), erasers for all of them (our folder of a two-expert
    model, or a folder with one eraser folder per expert), each expert getting its own.
    scale: the eraser scale; None uses the folder's (1.0 for the published format), 0 switches them off.
    The erasers take the dtype and device of the blocks' weights. Returns the transformer (the pipeline,
    where erasers went into several experts).
    """
    targets = _transformers_of(transformer)
    for name, t in targets.items():
        if getattr(t, _STATE, None):
            raise UnlearnError(f"erasers are already attached to {name}; call detach_erasers first")
    layout, per_expert = _expert_layout(eraser_dir), _per_expert_folders(eraser_dir)
    several = layout or per_expert
    if len(targets) > 1 and not several:
        raise UnlearnError(f"{eraser_dir}: erasers for one transformer, but the pipeline has the experts "
                           f"{', '.join(targets)}: attach them to one of them (attach_erasers(pipe.transformer, "
                           "...)) or give erasers trained on both")
    if several and len(targets) == 1:
        raise UnlearnError(f"{eraser_dir}: erasers for the experts "
                           f"{', '.join(n for n, _ in layout) if layout else ', '.join(per_expert)} of a two-expert "
                           "pipeline: pass that pipeline (it holds transformer and transformer_2)")
    if not several:
        (name, t), = targets.items()
        family = _family_of(t)
        site = family.eraser_site_from_dict(dict(t.config))
        cfg, modules = read_eraser_folder(eraser_dir, site)
        return _attach(t, site, cfg, modules, Path(eraser_dir), scale)
    plan = _expert_plan(targets, eraser_dir, layout, per_expert)
    done = []
    try:
        for t, site, cfg, modules, where in plan:
            _attach(t, site, cfg, modules, where, scale)
            done.append(t)
    except BaseException:
        for t in done:
            detach_erasers(t)
        raise
    return transformer


def _expert_plan(targets: dict, eraser_dir, layout, per_expert) -> list:
    """(transformer, site, config, its modules, where) for each expert of a pipeline."""
    where = Path(eraser_dir)
    names = [n for n, _ in layout] if layout else per_expert
    if list(names) != list(targets):
        raise ModelFamilyError(f"{where}: erasers for the experts {', '.join(names)}, but the pipeline has "
                               f"{', '.join(targets)}")
    sites = {n: _family_of(t).eraser_site_from_dict(dict(t.config)) for n, t in targets.items()}
    if per_expert:
        plan = []
        for n, t in targets.items():
            cfg, modules = read_eraser_folder(where / n, sites[n])
            plan.append((t, sites[n], cfg, modules, where / n))
        return plan
    first = sites[names[0]]
    total = sum(rows for _, rows in layout)
    stacked = dataclasses.replace(first, num_layers=total)
    cfg, modules = read_eraser_folder(where, stacked)
    plan, start = [], 0
    for n, rows in layout:
        one = dict(cfg, num_layers=rows)
        plan.append((targets[n], sites[n], one, _expert_modules(modules, sites[n], start, rows), where))
        start += rows
    return plan


def _attach(transformer, site: EraserSite, cfg: dict, modules: dict, where: Path, scale):
    """Attaches one transformer's erasers (its modules in PyTorch layout, named for its `site`)."""
    blocks = transformer.get_submodule(site.torch_blocks)
    L = len(blocks)
    attn0 = blocks[0].get_submodule(site.torch_attention)
    D = site.dim
    if cfg["num_layers"] is not None and cfg["dim"] is not None and (cfg["num_layers"], cfg["dim"]) != (L, D):
        raise ModelFamilyError(f"{where}: erasers for a transformer with {cfg['num_layers']} blocks of width "
                               f"{cfg['dim']}, but this one has {L} blocks of width {D} (another base model?)")
    s = cfg["scale"] if scale is None else float(scale)
    rank = cfg["eraser_rank"]
    kind = cfg["eraser_type"]

    # the modules the folder should have for this transformer, and their constructors
    expected = {}
    for i, block in enumerate(blocks):
        attn = block.get_submodule(site.torch_attention)
        if kind == "adapter":
            expected[site.published_prefix.format(layer=i)] = (
                attn, "adapter", functools.partial(AdapterEraser, D, rank, s, site.torch_output))
            continue
        for t in cfg["lora_targets"]:
            if t not in site.torch_lora_modules:
                raise ConversionError(f"{where}: unknown LoRA target {t!r}")
            lin = attn.get_submodule(site.torch_lora_modules[t])
            expected[f"{site.lora_module(t).format(layer=i)}.eraser_lora"] = (
                lin, "eraser_lora", functools.partial(LoRAEraser, lin.in_features, lin.out_features, rank, s))
    block_key = re.compile(rf"^{re.escape(site.torch_blocks)}\.(\d+)\.")
    found_blocks = {int(m.group(1)) for k in modules if (m := block_key.match(k))}
    if kind == "adapter":
        probe = modules.get(site.published_prefix.format(layer=0), {}).get("down.weight")
        if probe is not None and probe.ndim == 2:
            if probe.shape[1] != D or (found_blocks and max(found_blocks) + 1 != L):
                raise ModelFamilyError(
                    f"{where}: erasers for a transformer with {max(found_blocks) + 1} blocks of width "
                    f"{probe.shape[1]}, but this one has {L} blocks of width {D} (another base model?)")
            if probe.shape[0] != rank:
                raise ConversionError(f"{where}: {CONFIG_NAME} says eraser_rank {rank}, but the weights have rank "
                                      f"{probe.shape[0]}")
    else:
        first = next(iter(expected), None)
        probe = modules.get(first, {}).get("lora_A.weight") if first else None
        if found_blocks and max(found_blocks) + 1 != L or (probe is not None and probe.shape[-1] != D):
            raise ModelFamilyError(f"{where}: LoRA erasers for {max(found_blocks) + 1} blocks of width "
                                   f"{None if probe is None else probe.shape[-1]}, but this transformer has {L} "
                                   f"blocks of width {D} (another base model?)")
        if probe is not None and probe.shape[0] != rank:
            raise ConversionError(f"{where}: {CONFIG_NAME} says eraser_rank {rank}, but the weights have rank "
                                  f"{probe.shape[0]}")
    missing = sorted(set(expected) - set(modules))
    unexpected = sorted(set(modules) - set(expected))
    if missing or unexpected or not expected:
        raise ConversionError(f"{where}: erasers do not fit this transformer: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")

    ref = attn0.get_submodule(site.torch_lora_modules["to_q"]).weight
    made = []
    try:
        for name, (parent, child, make) in expected.items():
            eraser = make()
            try:
                eraser.load_state_dict(modules[name], strict=True)
            except RuntimeError as e:
                raise ConversionError(f"{where}: {name}: {_one_line(e, 300)}") from None
            eraser.to(device=ref.device, dtype=ref.dtype)
            parent.add_module(child, eraser)
            hook = _adapter_hook if child == "adapter" else _lora_hook
            made.append((parent, child, parent.register_forward_hook(hook)))
    except BaseException:
        for parent, child, handle in made:
            handle.remove()
            delattr(parent, child)
        raise
    setattr(transformer, _STATE, {"entries": made, "kind": kind, "source": str(where)})
    return transformer


def attached_erasers(transformer) -> list[nn.Module]:
    """The eraser modules attached to a transformer, or to every expert of a pipeline (empty if none)."""
    out = []
    for t in _transformers_of(transformer).values():
        state = getattr(t, _STATE, None) or {"entries": []}
        out += [getattr(parent, child) for parent, child, _ in state["entries"]]
    return out


def set_eraser_scale(transformer, scale: float):
    """Sets the scale of every attached eraser (0 switches them off without detaching)."""
    erasers = attached_erasers(transformer)
    if not erasers:
        raise UnlearnError("no erasers are attached to this transformer")
    for e in erasers:
        e.scale = float(scale)
    return transformer


def detach_erasers(transformer):
    """Removes the attached erasers (hooks and modules) from a transformer or every expert of a pipeline:
    the stock model again. Returns what it was given."""
    for t in _transformers_of(transformer).values():
        state = getattr(t, _STATE, None)
        if state:
            for parent, child, handle in state["entries"]:
                handle.remove()
                delattr(parent, child)
        if hasattr(t, _STATE):
            delattr(t, _STATE)
    return transformer
