"""Declarative weight conversion between PyTorch checkpoints (safetensors) and JAX parameter trees.

A model family declares a table of `Rule`s: a PyTorch key template (``{layer}`` stands for a
block index), the dotted path of the JAX leaf, and a `Transform` that maps the tensor's
layout both ways. Layers of a scanned stack live in one JAX leaf with a leading layer axis;
``{layer}`` selects the slice. The same table drives import (`load_params`) and export
(`iter_torch_tensors`). Every problem (missing, unexpected, misshaped keys) is collected and
raised together in one `ConversionError`; nothing is matched by substring guessing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import ConversionError, UnlearnError

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Transforms: how one tensor's layout differs between PyTorch and JAX.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    jax_shape: Callable[[Shape], Shape]
    torch_shape: Callable[[Shape], Shape]


IDENTITY = Transform("identity", lambda a: a, lambda a: a, tuple, tuple)

# torch.nn.Linear stores (out, in); a JAX kernel is (in, out).
LINEAR = Transform(
    "linear",
    lambda a: np.ascontiguousarray(a.T),
    lambda a: np.ascontiguousarray(a.T),
    lambda s: tuple(s[::-1]),
    lambda s: tuple(s[::-1]),
)


def flatten_in(in_shape: Shape) -> Transform:
    """A convolution whose stride equals its kernel (a patch embedding), stored as a linear kernel.

    PyTorch (out, *in_shape) <-> JAX (prod(in_shape), out), the patch flattened in PyTorch order.
    """
    in_shape = tuple(in_shape)

    def to_jax(a):
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)

    def to_torch(a):
        return np.ascontiguousarray(a.T).reshape(a.shape[1], *in_shape)

    def jax_shape(s):
        return (math.prod(s[1:]), s[0]) if tuple(s[1:]) == in_shape else ("mismatch",) + tuple(s)

    return Transform(f"flatten_in{in_shape}", to_jax, to_torch, jax_shape, lambda s: (s[1], *in_shape))


def squeeze_leading(n: int = 1) -> Transform:
    """A PyTorch buffer with leading singleton axes (e.g. (1, N, D) positional table) -> (N, D)."""

    def jax_shape(s):
        return tuple(s[n:]) if tuple(s[:n]) == (1,) * n else ("mismatch",) + tuple(s)

    return Transform(
        f"squeeze_leading{n}",
        lambda a: a.reshape(a.shape[n:]),
        lambda a: a.reshape((1,) * n + a.shape),
        jax_shape,
        lambda s: (1,) * n + tuple(s),
    )


# --------------------------------------------------------------------------------------------
# Rules and tables
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # e.g. "transformer_blocks.{layer}.attn1.to_q.weight"
    jax: str  # e.g. "blocks.attn1.to_q.kernel"
    transform: Transform = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.torch

    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.torch).replace(re.escape("{layer}"), r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor's place: the JAX leaf, the layer slice (None if unstacked), the transform."""

    torch_key: str
    jax_path: str
    layer: int | None
    transform: Transform


class RuleTable:
    def __init__(self, rules: Iterable[Rule], num_layers: int, family: str):
        self.rules = tuple(rules)
        self.num_layers = num_layers
        self.family = family
        self._regex = [(r, r.regex()) for r in self.rules]
        seen = [r.jax for r in self.rules]
        dup = {p for p in seen if seen.count(p) > 1}
        if dup:
            raise ValueError(f"rule table {family}: JAX paths claimed twice: {sorted(dup)}")

    def match(self, torch_key: str) -> Entry | None:
        for rule, rx in self._regex:
            m = rx.match(torch_key)
            if m:
                layer = int(m.group(1)) if rule.stacked else None
                if layer is not None and layer >= self.num_layers:
                    return None
                return Entry(torch_key, rule.jax, layer, rule.transform)
        return None

    def entries(self, jax_paths: Iterable[str] | None = None) -> list[Entry]:
        """Every PyTorch tensor the model has, in table order (restricted to `jax_paths` if given)."""
        wanted = None if jax_paths is None else set(jax_paths)
        out = []
        for rule in self.rules:
            if wanted is not None and rule.jax not in wanted:
                continue
            if rule.stacked:
                out += [Entry(rule.torch.format(layer=i), rule.jax, i, rule.transform) for i in range(self.num_layers)]
            else:
                out.append(Entry(rule.torch, rule.jax, None, rule.transform))
        return out


# --------------------------------------------------------------------------------------------
# Reading safetensors folders lazily, one tensor at a time
# --------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """The tensors of a folder: one `*.safetensors` file, several, or a sharded set with an index.

    Only headers are read up front (names, shapes, dtypes); `get` reads one tensor from disk.
    """

    def __init__(self, folder: str | os.PathLike, prefer: str | None = None):
        folder = Path(folder)
        self.folder = folder
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if prefer and (folder / f"{prefer}.index.json").exists():
            indexes = [folder / f"{prefer}.index.json"]
        if indexes:
            if len(indexes) > 1:
                raise UnlearnError(f"{folder}: several safetensors index files {[p.name for p in indexes]}; keep one")
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UnlearnError(f"{indexes[0]}: not a safetensors index (no readable 'weight_map'): {e}") from None
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
            if prefer and (folder / prefer).exists():
                files = [folder / prefer]
        if not files:
            raise UnlearnError(f"{folder}: no .safetensors weights found (PyTorch .bin checkpoints are not read)")
        self._where: dict[str, tuple[Path, dict]] = {}
        self._data_start: dict[Path, int] = {}
        for f in files:
            if not f.exists():
                raise UnlearnError(f"{f}: listed in the safetensors index but missing")
            header, self._data_start[f] = _read_header(f)
            for key, info in header.items():
                self._where[key] = (f, info)
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> Shape:
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(_ST_DTYPES[self._where[key][1]["dtype"]])

    def get(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """Reads one tensor with plain file reads (no memory map: mapped pages would stay resident
        and count as a second copy of the checkpoint); into `out` if given (same shape and dtype)."""
        path, info = self._where[key]
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if out is None:
            out = np.empty(shape, dtype)
        elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{key}: destination {out.shape} {out.dtype} does not fit {shape} {dtype}")
        if end - start != out.nbytes:
            raise UnlearnError(f"{path}: tensor {key} has {end - start} bytes, its shape needs {out.nbytes}")
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        f = self._handles[path]
        f.seek(self._data_start[path] + start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = f.readinto(view)
        if got != out.nbytes:
            raise UnlearnError(f"{path}: truncated file (tensor {key} cut short)")
        return out

    def close(self):
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def _read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UnlearnError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    for key, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise UnlearnError(f"{path}: tensor {key} has unsupported dtype {info.get('dtype')}")
    return header, 8 + n


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping, specs=None):
    """Writes a safetensors file atomically, streaming tensor by tensor.

    `specs` ({key: (shape, dtype)}, in write order) lets the header be written before the data, so
    that `tensors` can be a generator and only one tensor is in memory at a time.
    """
    if isinstance(tensors, Mapping):
        tensors = list(tensors.items())
        specs = {k: (v.shape, v.dtype) for k, v in tensors}
    if specs is None:
        tensors = list(tensors)
        specs = {k: (v.shape, v.dtype) for k, v in tensors}
    header, offset = {}, 0
    for key, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        nbytes = int(math.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        written = []
        for key, arr in tensors:
            shape, dtype = specs[key]
            arr = np.ascontiguousarray(arr)
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: got {arr.shape} {arr.dtype}, header says {tuple(shape)} {np.dtype(dtype)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            written.append(key)
        if written != list(specs):
            raise ValueError(f"tensors written {written} differ from the header's {list(specs)}")


# --------------------------------------------------------------------------------------------
# Import: PyTorch tensors -> JAX leaves (sharded, streamed)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    shape: Shape
    dtype: np.dtype | None  # None: keep the checkpoint's dtype
    sharding: jax.sharding.Sharding | None


def plan_import(table: RuleTable, torch_shapes: Mapping[str, Shape], targets: Mapping[str, Target], where: str):
    """Maps every PyTorch key to its JAX leaf; raises one `ConversionError` listing every problem."""
    missing, unexpected, misshaped, unmapped = [], [], [], []
    plan: dict[str, list[Entry]] = {p: [] for p in targets}
    for key, shape in torch_shapes.items():
        e = table.match(key)
        if e is None or e.jax_path not in targets:
            unexpected.append(key)
            continue
        want = targets[e.jax_path].shape[1:] if e.layer is not None else targets[e.jax_path].shape
        got = e.transform.jax_shape(tuple(shape))
        if tuple(got) != tuple(want):
            misshaped.append(f"{key}: checkpoint {tuple(shape)} -> {tuple(got)}, model expects {tuple(want)}")
            continue
        plan[e.jax_path].append(e)
    expected = {e.torch_key for e in table.entries(targets)}
    missing = sorted(expected - set(torch_shapes))
    covered = {r.jax for r in table.rules}
    unmapped = sorted(p for p in targets if p not in covered)
    if missing or unexpected or misshaped or unmapped:
        parts = []
        for name, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                            ("misshaped", misshaped), ("model leaves with no rule", unmapped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{len(items)} {name}: " + "; ".join(shown))
        raise ConversionError(f"{where}: weights do not fit the {table.family} model: " + " | ".join(parts))
    return plan


FLOATING = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))


def refuse_non_floating(dtypes: Mapping[str, np.dtype], where: str):
    """One line when a checkpoint holds integer (or other non-float) tensors: cast into the model they would
    silently become other values. Checked from the headers, before any tensor is read."""
    bad = {k: np.dtype(d).name for k, d in dtypes.items() if np.dtype(d) not in FLOATING}
    if bad:
        key, dt = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConversionError(f"{where}: tensor {key} is {dt}{more}; weights must be floating point (float32, "
                              "bfloat16 or float16): integer tensors would be cast silently into other values")


def load_params(reader: SafetensorsReader, table: RuleTable, targets: Mapping[str, Target], where: str,
                progress: bool = False) -> dict[str, jax.Array]:
    """Reads every tensor once and places it straight into its sharded JAX leaf.

    One leaf is assembled at a time on the host (a stacked leaf gathers its layers), then put on
    its devices; the host buffer is dropped before the next leaf, so the host never holds a
    second copy of the whole checkpoint.
    """
    plan = plan_import(table, {k: reader.shape(k) for k in reader.keys()}, targets, where)
    refuse_non_floating({e.torch_key: reader.dtype(e.torch_key) for es in plan.values() for e in es}, where)
    out = {}
    # Largest leaves first: while a leaf is put on its devices its host buffer briefly coexists with
    # the device copy, and that overlap is smallest when few other leaves are resident yet.
    items = sorted(plan.items(), key=lambda kv: -math.prod(targets[kv[0]].shape))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(reader.keys()), desc="loading weights", unit="tensor", leave=False)
    for path, entries in items:
        tgt = targets[path]
        dtype = tgt.dtype
        if dtype is None:
            dtype = reader.dtype(entries[0].torch_key)
            if dtype == np.float64:  # JAX runs without x64: float64 buffers become float32
                dtype = np.dtype(np.float32)
        buf = np.empty(tgt.shape, dtype)
        for e in entries:
            dest = buf if e.layer is None else buf[e.layer]
            if e.transform is IDENTITY and reader.dtype(e.torch_key) == dtype:
                reader.get(e.torch_key, out=dest)  # straight from the file into place
            else:
                dest[...] = e.transform.to_jax(reader.get(e.torch_key))
            if bar is not None:
                bar.update(1)
        out[path] = _place(buf, tgt.sharding)
        del buf
    if bar is not None:
        bar.close()
    return out


def _place(buf: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(buf)
    return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])


# --------------------------------------------------------------------------------------------
# Export: JAX leaves -> PyTorch tensors
# --------------------------------------------------------------------------------------------
def iter_torch_tensors(table: RuleTable, leaves: Mapping[str, jax.Array], dtypes: Mapping[str, np.dtype] | None = None
                       ) -> tuple[dict[str, tuple[Shape, np.dtype]], Iterator[tuple[str, np.ndarray]]]:
    """Header specs and a generator of (torch key, array), one tensor materialised at a time.

    `dtypes` optionally overrides the dtype a PyTorch key is written in (e.g. the checkpoint's own).
    """
    missing = sorted(r.jax for r in table.rules if r.jax not in leaves)
    if missing:
        raise ConversionError(f"cannot export the {table.family} model: JAX leaves missing: {missing}")
    entries = table.entries(leaves)
    dtypes = dict(dtypes or {})
    specs = {}
    for e in entries:
        leaf = leaves[e.jax_path]
        shape = leaf.shape[1:] if e.layer is not None else leaf.shape
        specs[e.torch_key] = (e.transform.torch_shape(tuple(shape)), np.dtype(dtypes.get(e.torch_key, leaf.dtype)))

    def gen():
        for e in entries:
            leaf = leaves[e.jax_path]
            part = leaf[e.layer] if e.layer is not None else leaf
            arr = e.transform.to_torch(np.asarray(jax.device_get(part)))
            yield e.torch_key, arr.astype(specs[e.torch_key][1], copy=False)

    return specs, gen()



# --------------------------------------------------------------------------------------------
# The one generic loader / writer of a module (transformer, text encoder, VAE) by its rule table
# --------------------------------------------------------------------------------------------
def module_targets(abstract, *, dtype=None, mesh=None, rules=(), replicate: bool = False) -> dict[str, Target]:
    """The JAX leaves a checkpoint fills, from a (shape-only) NNX module.

    dtype: every leaf's dtype; None keeps the checkpoint's, "model" keeps the module's own
        (mixed-precision modules: fp32 norms beside 16-bit weights).
    mesh: place each leaf sharded by its logical axes (`rules`), or replicated with `replicate`.
    """
    from flax import nnx

    from unlearn_jax.parallel import named_sharding

    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(var.shape)
        sharding = None
        if mesh is not None:
            if replicate:
                sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            else:
                sharding = named_sharding(var.get_metadata().get("out_sharding"), shape, mesh, rules)
        leaf_dtype = np.dtype(var.dtype) if isinstance(dtype, str) and dtype == "model" else dtype
        targets[".".join(map(str, path))] = Target(shape, leaf_dtype, sharding)
    return targets


def assemble(abstract, leaves: Mapping[str, jax.Array]):
    """The module `abstract` with its parameters replaced by `leaves` (dotted path -> array)."""
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        flat.append((path, var.replace(leaves[key]) if key in leaves else var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_into(abstract, reader, table: RuleTable, where: str, *, dtype=None, mesh=None, rules=(),
              replicate: bool = False, progress: bool = False):
    """Streams a checkpoint (`reader`: a `SafetensorsReader` or any object with its interface) into
    the module `abstract` by `table`; every misfit raises one `ConversionError` listing all of them."""
    targets = module_targets(abstract, dtype=dtype, mesh=mesh, rules=rules, replicate=replicate)
    return assemble(abstract, load_params(reader, table, targets, where, progress=progress))


def param_leaves(module) -> dict[str, jax.Array]:
    """Flat {dotted path: array} of a module's parameters (the rule table's JAX side)."""
    from flax import nnx

    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def split_shards(specs, max_bytes: int) -> list[list[str]]:
    """Keys in order, grouped into files of at most `max_bytes` (a tensor never spans two)."""
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


def write_module(folder: Path, module, table: RuleTable, weights_name: str, dtype=None,
                 max_shard_size: int = 10 * 2**30):
    """Writes a module's parameters by `table` into `folder` as diffusers / transformers do: one
    `weights_name` file, or numbered shards with a `<weights_name>.index.json` above `max_shard_size`.
    `folder` is the caller's (temporary) output folder."""
    wanted = {r.jax for r in table.rules}
    leaves = {k: v for k, v in param_leaves(module).items() if k in wanted}
    specs, tensors = iter_torch_tensors(table, leaves)
    if dtype is not None:
        specs = {k: (s, dtype) for k, (s, _) in specs.items()}
        tensors = ((k, a.astype(dtype)) for k, a in tensors)
    shards = split_shards(specs, max_shard_size)
    if len(shards) == 1:
        write_safetensors(folder / weights_name, tensors, specs)
        return
    stem, ext = weights_name.rsplit(".", 1)
    weight_map, total = {}, 0
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        sub = {k: specs[k] for k in keys}
        write_safetensors(folder / name, (next(tensors) for _ in keys), sub)
        weight_map.update({k: name for k in keys})
        total += sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in sub.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
