"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (e.g. ("layers", "embed", "mlp")); a rules list maps
each logical name to a mesh axis (or None = replicated). Rules come from the config, so the same
model shards as data parallel, FSDP or tensor parallel without touching model code.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax.errors import UnlearnError

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Sensible defaults: FSDP over the weights' model dimension, tensor parallelism over heads/mlp,
# the batch over data and fsdp.
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("norm", None),
    ("temb", None),
    ("adaln", ("tensor", "fsdp")),  # the modulation projections are ~15% of a CogVideoX block
    ("patch", None),
    ("text_embed", None),
    ("freq", None),
    ("pos", None),
    ("out", None),
    ("length", None),
    ("vocab", None),
    ("rank", None),
    ("relpos_buckets", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with named axes; one axis may be -1 (= the rest).

    A mesh of fewer devices than present uses the first ones (single-process runs only)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1, "fsdp": 1, "tensor": 1})
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise UnlearnError(f"mesh {shape}: at most one axis may be -1")
    known = int(np.prod([v for v in shape.values() if v != -1]))
    if free:
        if len(devices) % known:
            raise UnlearnError(f"mesh {shape}: {len(devices)} devices do not divide by {known}")
        shape[free[0]] = len(devices) // known
    need = int(np.prod(list(shape.values())))
    # A smaller mesh takes the first devices; only within one process (a multi-host mesh spans all).
    if need > len(devices) or (need < len(devices) and jax.process_count() > 1):
        raise UnlearnError(f"mesh {shape} needs {need} devices, {len(devices)} present")
    arr = np.asarray(devices[:need]).reshape(tuple(shape.values()))
    return Mesh(arr, tuple(shape.keys()))


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (later uses are replicated).

    With `mesh` given, mesh axes absent from it or of size 1 are dropped.
    """
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a 4-wide bias on an 8-way axis)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        keep, size = [], 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                keep.append(n)
                size *= mesh.shape[n]
        out.append(keep[0] if len(keep) == 1 else (tuple(keep) or None))
    return PartitionSpec(*out)


def named_sharding(axes, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules, mesh), shape, mesh))
