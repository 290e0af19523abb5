"""Checks of an erase config before any work, and of a resume against the run it continues.

`validate_erase_config(cfg)` refuses, in one line, every field outside its allowed range (named with
the range), every unknown field (a typo in a config file would otherwise be ignored) and every
inconsistent pair of fields. The choices that other modules define (attention kernels, eraser
kinds, samplers, ...) are read from those modules when a config is checked, so they never drift.
`trajectory_changes(old, new)` names the fields a resumed run may not
change: those that change what the training computes (`TRAJECTORY_FIELDS`); `NOT_TRAJECTORY` says
for each other field why it may change. Nothing here touches files or devices.
"""
from __future__ import annotations

import difflib
import json
import math
from typing import Any, Callable, Mapping

from unlearn_jax.dtypes import ALIASES as _DTYPE_ALIASES
from unlearn_jax.dtypes import NAMES as DTYPES
from unlearn_jax.errors import UnlearnError
from unlearn_jax.objectives import MASK_MODES

AUGMENT_MODES = ("none", "offline", "file")
TOKEN_FALLBACKS = ("all", "none")
CPU_COLLECTIVES = ("gloo", "mpi", "megascale")  # jax_cpu_collectives_implementation
SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits: a larger seed silently equals another one

# Fields whose change alters the training trajectory: a resume with one of them changed is refused.
# A section name stands for every field in it.
TRAJECTORY_FIELDS = (
    "seed",
    "model.dtype", "model.param_dtype", "model.text_dtype",
    "video",
    "concepts",
    "prompts.file", "prompts.augment", "prompts.num_augmented", "prompts.max_concept_tokens",
    "prompts.token_fallback",
    "sampler",
    "erase.eta", "erase.alpha_loc", "erase.beta_pre", "erase.mask_threshold", "erase.mask_mode",
    "erase.mask_key_chunk",  # the chunked log-sum-exp rounds differently with another chunk: not bitwise the same
    "eraser",
    "train.batch_size", "train.learning_rate", "train.adam_b1", "train.adam_b2", "train.adam_eps",
    "train.weight_decay", "train.grad_clip",
    "robust",
    "check",  # its verdicts stop the run and revert it; with check.every > 0 the evaluate fields it reads count too
)
# The evaluate fields the in-run check reads (a trajectory field while check.every > 0).
CHECK_READS = ("evaluate.erased_concepts", "evaluate.num_steps", "evaluate.guidance_scale")

# Every other field, and why a resumed run may change it.
NOT_TRAJECTORY = {
    "workdir": "where the run lives",
    "model.path": "the same model may have moved (its weights are checked when loaded)",
    "model.attention": "another kernel for the same attention (resume on other hardware)",
    "model.attention_chunk": "a memory layout of the same attention",
    "model.remat": "recomputation only: the same values",
    "prompts.cache_dir": "where the embeddings are cached, not what they are",
    "train.num_steps": "only where the run stops: the learning rate is constant and each step's batch and noise "
                       "are a function of the step alone, so more steps continue the same trajectory (fewer than "
                       "the checkpoint's step end the run there)",
    "train.log_every": "bookkeeping",
    "train.checkpoint_every": "bookkeeping",
    "train.keep_checkpoints": "bookkeeping",
    "mesh": "how the same computation is split over devices",
    "distributed": "how the processes find each other",
    "evaluate": "runs after training (while check.every > 0 the fields of CHECK_READS also steer the run)",
    "export": "runs after training",
}

# Fields whose value is a dict or list of free entries (not sub-fields).
_LEAF_CONTAINERS = ("concepts", "mesh.shape", "mesh.rules", "export.formats", "evaluate.erased_concepts")


# --------------------------------------------------------------------------------------------
# Value rules: each returns None when the value is allowed, else the requirement (for the message)
# --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int, hi: int | None = None, note: str = "") -> Callable:
    req = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def check(v):
        ok = _is_int(v) and v >= lo and (hi is None or v <= hi)
        return None if ok else req + note
    return check


def number(lo: float | None = None, lo_open: bool = False, hi: float | None = None, hi_open: bool = False,
           note: str = "") -> Callable:
    if lo is not None and hi is not None:
        req = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        req = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        req = "a finite number"

    def check(v):
        if not _is_num(v) or not math.isfinite(v):
            return req + note
        if lo is not None and (v <= lo if lo_open else v < lo):
            return req + note
        if hi is not None and (v >= hi if hi_open else v > hi):
            return req + note
        return None
    return check


def choice(options, note: str = "", shown=None) -> Callable:
    req = "one of " + ", ".join(shown or options)

    def check(v):
        return None if isinstance(v, str) and v in options else req + note
    return check


def text(note: str = "") -> Callable:
    def check(v):
        return None if isinstance(v, str) and v.strip() else "a non-empty string" + note
    return check


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def optional(rule: Callable) -> Callable:
    def check(v):
        if v is None:
            return None
        why = rule(v)
        return None if why is None else f"{why} (or None)"
    return check


def strings(v):
    ok = isinstance(v, (list, tuple)) and all(isinstance(s, str) and s.strip() for s in v)
    return None if ok else "a list of non-empty strings"


_DTYPE = choice(_DTYPE_ALIASES, shown=DTYPES)
_SEED = integer(0, SEED_LIMIT - 1, " (JAX keys take 32-bit seeds)")
_ETA = number(0, lo_open=True, note=" (a negative eta pushes the model toward the concept instead of away from it, "
                                    "amplifying what should be erased)")


def choices() -> dict[str, tuple]:
    """The allowed values that other modules define, read from them (imported here, not at import time)."""
    import dataclasses

    from unlearn_jax import erase, erase_data, erasers, prompts, schedulers, train
    from unlearn_jax.models import layers

    return {"attention": tuple(layers.ATTENTION_IMPLS), "remat": tuple(layers.REMAT_POLICIES),
            "eraser_kinds": tuple(erasers.KINDS), "timestep_modes": tuple(train.TIMESTEP_MODES),
            "xt_sources": tuple(train.XT_SOURCES), "concept_types": tuple(prompts.CONCEPT_TYPES),
            "samplers": tuple(schedulers.KINDS), "export_formats": tuple(erase.EXPORT_FORMATS),
            "concept_keys": tuple(f.name for f in dataclasses.fields(erase_data.ConceptSpec))}


def rules(ch: Mapping[str, tuple] | None = None) -> dict[str, Callable]:
    """Field -> its rule, for every field that holds one value."""
    ch = choices() if ch is None else ch
    return {
        "workdir": text(),
        "seed": _SEED,
        "model.path": text(": pass --config.model.path=/path/to/pipeline"),
        "model.dtype": _DTYPE,
        "model.param_dtype": _DTYPE,
        "model.attention": choice(ch["attention"]),
        "model.attention_chunk": integer(1),
        "model.remat": choice(ch["remat"]),
        "model.text_dtype": optional(_DTYPE),
        "video.num_frames": integer(1),
        "video.height": integer(1),
        "video.width": integer(1),
        "prompts.file": optional(text()),
        "prompts.augment": choice(AUGMENT_MODES),
        "prompts.num_augmented": integer(0),
        "prompts.cache_dir": optional(text()),
        "prompts.max_concept_tokens": integer(1),
        "prompts.token_fallback": choice(TOKEN_FALLBACKS),
        "sampler.num_steps": integer(1),
        "sampler.guidance_scale": number(0),
        "sampler.guidance_scale_2": optional(number(0, note=" (two-stage models: below the expert boundary)")),
        "sampler.kind": optional(choice(ch["samplers"], " (None: the model family's)")),
        "sampler.timestep_mode": choice(ch["timestep_modes"]),
        "sampler.xt_source": choice(ch["xt_sources"]),
        "sampler.bank_size": integer(1),
        "erase.eta": _ETA,
        "erase.alpha_loc": number(0),
        "erase.beta_pre": number(0),
        "erase.mask_threshold": number(0, hi=1),
        "erase.mask_mode": choice(MASK_MODES),
        "erase.mask_key_chunk": integer(1),
        "eraser.kind": choice(ch["eraser_kinds"]),
        "eraser.rank": integer(1),
        "eraser.scale": number(),
        "train.num_steps": integer(1),
        "train.batch_size": integer(1),
        "train.learning_rate": number(0, lo_open=True),
        "train.adam_b1": number(0, hi=1, hi_open=True),
        "train.adam_b2": number(0, hi=1, hi_open=True),
        "train.adam_eps": number(0, lo_open=True),
        "train.weight_decay": number(0),
        "train.grad_clip": number(note=" (<= 0 turns clipping off)"),
        "robust.every": integer(0, note=" (0 turns adversarial erasure off)"),
        "robust.method": choice(("soft",), " (the inner attack)"),
        "robust.steps": integer(1),
        "robust.learning_rate": number(0, lo_open=True),
        "robust.weight": number(0),
        "train.log_every": integer(1),
        "train.checkpoint_every": integer(1),
        "train.keep_checkpoints": integer(1),
        "distributed.enabled": boolean,
        "distributed.coordinator_address": optional(text()),
        "distributed.num_processes": optional(integer(1)),
        "distributed.process_id": optional(integer(0)),
        "distributed.cpu_collectives": optional(choice(CPU_COLLECTIVES)),
        "check.every": integer(0, note=" (0 turns the in-run check off)"),
        "check.n": integer(1),
        "check.n_other": integer(1),
        "check.seed": _SEED,
        "check.erased_target": number(0, hi=1),
        "check.erased_broken_limit": number(0, hi=1),
        "check.drop_margin": number(0, hi=1),
        "check.pooled_margin": number(0, hi=1),
        "check.broken_margin": number(0, hi=1),
        "check.max_reverts": integer(0),
        "check.confirm": integer(1),
        "check.lr_decay": number(0, lo_open=True, hi=1, hi_open=True),
        "evaluate.toy_world": boolean,
        "evaluate.erased_concepts": strings,
        "evaluate.n": integer(1),
        "evaluate.num_steps": integer(1),
        "evaluate.guidance_scale": number(0),
        "evaluate.seed": _SEED,
    }


# --------------------------------------------------------------------------------------------
# Fields with structure: concepts, mesh, export formats
# --------------------------------------------------------------------------------------------
def _concept_problems(concepts, ch: Mapping[str, tuple]) -> list[str]:
    if not isinstance(concepts, (list, tuple)) or not concepts:
        return ["config.concepts: must be a non-empty list of concepts ({phrase, type, eta, preserve, prompts, "
                "aliases})"]
    out, phrases = [], []
    for i, c in enumerate(concepts):
        where = f"config.concepts[{i}]"
        if not isinstance(c, Mapping):
            out.append(f"{where}: must be a dict with a 'phrase', got {_show(c)}")
            continue
        unknown = sorted(set(c) - set(ch["concept_keys"]))
        if unknown:
            out.append(f"{where}: unknown keys {unknown} (allowed: {', '.join(ch['concept_keys'])})")
        if text()(c.get("phrase")) is not None:
            out.append(f"{where}.phrase={_show(c.get('phrase'))}: must be a non-empty string")
        else:
            phrases.append(c["phrase"])
        if "type" in c and choice(ch["concept_types"])(c["type"]) is not None:
            out.append(f"{where}.type={_show(c['type'])}: must be one of {', '.join(ch['concept_types'])}")
        if c.get("eta") is not None:
            why = _ETA(c["eta"])
            if why:
                out.append(f"{where}.eta={_show(c['eta'])}: must be {why}")
        for key in ("preserve", "prompts", "aliases"):
            if c.get(key) is not None and strings(c[key]) is not None:
                out.append(f"{where}.{key}={_show(c[key])}: must be a list of non-empty strings")
    dup = sorted({p for p in phrases if phrases.count(p) > 1})
    if dup:
        out.append(f"config.concepts: the phrase {dup[0]!r} is given twice (one entry per concept)")
    return out


def _mesh_problems(mesh: Mapping) -> list[str]:
    out = []
    shape = mesh.get("shape")
    if not isinstance(shape, Mapping) or not shape:
        out.append(f"config.mesh.shape={_show(shape)}: must be a dict of mesh axis name -> size")
    else:
        for name, size in shape.items():
            if not isinstance(name, str) or not name.isidentifier():
                out.append(f"config.mesh.shape: axis name {_show(name)} must be a name such as data, fsdp, tensor")
            if not _is_int(size) or (size < 1 and size != -1):
                out.append(f"config.mesh.shape.{name}={_show(size)}: must be an integer >= 1, or -1 for the remaining "
                           "devices")
        if sum(1 for s in shape.values() if s == -1) > 1:
            out.append(f"config.mesh.shape={_show(shape)}: -1 (the remaining devices) is allowed for one axis only")
    rules = mesh.get("rules")
    if rules is not None:
        ok = isinstance(rules, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
            and (r[1] is None or isinstance(r[1], str)
                 or (isinstance(r[1], (list, tuple)) and all(isinstance(a, str) for a in r[1])))
            for r in rules)
        if not ok:
            out.append(f"config.mesh.rules={_show(rules)}: must be a list of (logical axis, mesh axis | [mesh axes] | "
                       "None) pairs (or None for the defaults)")
    return out


def _export_problems(formats, eraser_kind, ch: Mapping[str, tuple]) -> list[str]:
    known = ch["export_formats"]
    if not isinstance(formats, (list, tuple)):
        return [f"config.export.formats={_show(formats)}: must be a list of {', '.join(known)}"]
    out = [f"config.export.formats: unknown format {_show(f)} (one of {', '.join(known)})"
           for f in formats if f not in known]
    dup = sorted({f for f in formats if isinstance(f, str) and list(formats).count(f) > 1})
    if dup:
        out.append(f"config.export.formats: {dup[0]!r} is listed twice")
    fits = {"t2vunlearning": ("adapter",), "lora": ("lora",), "diffusers": ("lora", "attn", "full")}
    for f in formats:
        if f in fits and eraser_kind in ch["eraser_kinds"] and eraser_kind not in fits[f]:
            out.append(f"config.export.formats: {f!r} cannot hold {eraser_kind} erasers (t2vunlearning: adapter; "
                       "lora: lora; diffusers, merged weights: lora / attn / full)")
    return out


def _cross_problems(c: Mapping) -> list[str]:
    out = []
    p = c.get("prompts", {})
    if p.get("augment") == "file" and not p.get("file"):
        out.append("config.prompts.augment='file' needs config.prompts.file (a JSONL from `unlearn-jax prompts "
                   "augment`)")
    k, e = c.get("check", {}), c.get("evaluate", {})
    if k.get("every") and _is_int(k.get("every")) and k["every"] > 0:
        if not e.get("toy_world"):
            out.append(f"config.check.every={k['every']}: the in-run check judges with the toy world's detector; "
                       "set config.evaluate.toy_world=True on a toy-world pipeline, or check.every=0")
        elif c.get("distributed", {}).get("enabled"):
            out.append(f"config.check.every={k['every']}: the in-run check runs in one process (toy-world runs); "
                       "set check.every=0 for a multi-host run")
        elif not e.get("erased_concepts"):
            out.append(f"config.check.every={k['every']}: needs config.evaluate.erased_concepts (the toy concepts "
                       "the check judges, e.g. ['colour:red'])")
    d = c.get("distributed", {})
    n, pid = d.get("num_processes"), d.get("process_id")
    if _is_int(n) and _is_int(pid) and pid >= n:
        out.append(f"config.distributed.process_id={pid}: must be in [0, num_processes - 1] = [0, {n - 1}]")
    if d.get("coordinator_address") and (n is None or pid is None):
        out.append("config.distributed.coordinator_address needs num_processes and process_id too")
    return out


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def _plain(x) -> Any:
    """A ConfigDict (or nested dicts / lists of them) as plain dicts and lists."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _show(v, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _get(c: Mapping, dotted: str, default=None):
    node = c
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return default
        node = node[k]
    return node


def _default_dict() -> dict:
    from unlearn_jax.erase_config import default_config

    return _plain(default_config())


def _fields(c: Mapping, prefix: str = "") -> list[str]:
    """Dotted names of every field (containers of free entries count as one field)."""
    out = []
    for k, v in c.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and name not in _LEAF_CONTAINERS:
            out += _fields(v, name + ".")
        else:
            out.append(name)
    return out


def _unknown_problems(c: Mapping, default: Mapping) -> list[str]:
    known = set(_fields(default))
    sections = {f.rsplit(".", 1)[0] for f in known if "." in f}
    out = []
    for f in _fields(c):
        if f in known or any(f.startswith(lc + ".") for lc in _LEAF_CONTAINERS):
            continue
        if f in sections:
            out.append(f"config.{f}={_show(_get(c, f))}: must be a section of fields (see erase_config.py)")
            continue
        head = f.rsplit(".", 1)[0] if "." in f else ""
        pool = sorted(g for g in known if (g.rsplit(".", 1)[0] if "." in g else "") == head) or sorted(known)
        close = difflib.get_close_matches(f, pool, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"config.{f}: no such field{hint}")
    return out


def problems(cfg) -> list[str]:
    """Every problem of an erase config, one short sentence each (empty: the config is valid)."""
    c = _plain(cfg)
    if not isinstance(c, Mapping):
        return [f"the erase config must be a ConfigDict (get_config() returned {type(cfg).__name__})"]
    default = _default_dict()
    ch = choices()
    out = _unknown_problems(c, default)
    missing = object()
    for field, rule in rules(ch).items():
        value = _get(c, field, missing)
        if value is missing:
            value = _get(default, field)
        why = rule(value)
        if why is not None:
            if field == "model.path" and value is None:
                out.append("config.model.path is not set: pass --config.model.path=/path/to/pipeline")
            else:
                out.append(f"config.{field}={_show(value)}: must be {why}")
    out += _concept_problems(c.get("concepts", default["concepts"]), ch)
    out += _mesh_problems(c.get("mesh", default["mesh"]))
    out += _export_problems(_get(c, "export.formats", default["export"]["formats"]), _get(c, "eraser.kind"), ch)
    out += _cross_problems(c)
    return out


def validate_erase_config(cfg) -> None:
    """Raises one one-line UnlearnError naming every invalid field and its allowed range."""
    found = problems(cfg)
    if len(found) == 1:
        raise UnlearnError(found[0])
    if found:
        raise UnlearnError(f"{len(found)} problems in the config: " + "; ".join(found))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def _normal(x):
    """Values as a JSON round trip leaves them (tuples -> lists), so a config read back from
    <workdir>/config.json compares equal to the one it was written from."""
    return json.loads(json.dumps(_plain(x), default=str))


def trajectory_changes(old_cfg_dict, new_cfg_dict) -> list[str]:
    """The dotted names of the TRAJECTORY_FIELDS whose values differ (a section: each changed field in it).

    A field the old config lacks (written by an older version) counts as its default value. Pass the
    new config as the run resolved it (sampler.kind None is replaced by the family's sampler before
    config.json is written), so that both sides hold the value the run used.
    """
    old, new, default = _normal(old_cfg_dict), _normal(new_cfg_dict), _normal(_default_dict())
    missing = object()
    out = []
    checked = any((_get(src, "check.every") or 0) > 0 for src in (old, new))
    for field in TRAJECTORY_FIELDS + (CHECK_READS if checked else ()):
        names = [field]
        if isinstance(_get(default, field), Mapping) or isinstance(_get(new, field), Mapping):
            keys = {}
            for src in (default, old, new):
                v = _get(src, field)
                if isinstance(v, Mapping):
                    keys.update(dict.fromkeys(v))
            names = [f"{field}.{k}" for k in keys]
        for name in names:
            a, b = _get(old, name, missing), _get(new, name, missing)
            a = _get(default, name) if a is missing else a
            b = _get(default, name) if b is missing else b
            if a != b:
                out.append(name)
    return out


def check_resume(old_cfg_dict, new_cfg_dict, workdir) -> None:
    """Refuses (one line) a resume that changes a TRAJECTORY_FIELD, naming each change."""
    changed = trajectory_changes(old_cfg_dict, new_cfg_dict)
    if not changed:
        return
    old, new = _normal(old_cfg_dict), _normal(new_cfg_dict)
    shown = ", ".join(f"{f} ({_show(_get(old, f), 30)} -> {_show(_get(new, f), 30)})" for f in changed[:4])
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    raise UnlearnError(f"{workdir}: holds a run with other values of {shown}{more}; these change the training "
                       "trajectory: resume with the run's values (train.num_steps may grow) or choose another "
                       "--config.workdir")


__all__ = ["NOT_TRAJECTORY", "TRAJECTORY_FIELDS", "check_resume", "choices", "problems", "rules", "trajectory_changes",
           "validate_erase_config"]
