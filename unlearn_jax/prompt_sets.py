"""Prompt CSV files and seeds: the one reader behind `unlearn-jax sample --prompts` and the evaluation.

    items = load_prompt_set("nudity_cogvideox", limit=10)   # a bundled set by name, or any CSV by path
    items[0]  # {"index": 0, "name": "0000", "prompt": "...", "seed": 90939, "seed_source": "seed",
              #  "concept": "naked body", "concept_type": "..."}

Seeds are integers in [0, 2**64 - 1] (the range of ``torch.Generator.manual_seed``), checked by
`check_seed`. A file's seed column (``seed``, else ``evaluation_seed``) gives each prompt its seed;
a file without one gets ``default_seed + row index`` (42, 43, ... by default), so that different
prompts never share one noise. This module imports neither JAX nor PyTorch.

The published evaluation sets ship with the package (`unlearn_jax/data/prompt_sets/`, see its
README) and load by name: `BUNDLED` lists them.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from unlearn_jax.errors import UnlearnError

MAX_SEED = 2**64 - 1
DEFAULT_SEED = 42
SEED_COLUMNS = ("seed", "evaluation_seed")
NAME_COLUMN = "case_number"
# Item keys set by the reader; a CSV column of the same name is kept as ``csv_<name>``.
RESERVED_KEYS = ("index", "name", "prompt", "seed", "seed_source")


def check_seed(seed, where: str = "seed") -> int:
    """A seed as an int in [0, 2**64 - 1] (the range of torch.Generator.manual_seed), or an UnlearnError.

    Takes ints, integral floats (``3.0``) and strings of either (``"12"``, ``"12.0"``)."""
    if isinstance(seed, (bool, np.bool_)):
        raise UnlearnError(f"{where} = {seed!r} is not an integer")
    if isinstance(seed, (float, np.floating)) and float(seed).is_integer():
        seed = int(seed)
    if isinstance(seed, str):
        s = seed.strip()
        try:
            seed = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                raise UnlearnError(f"{where} = {seed!r} is not an integer") from None
            if not (math.isfinite(f) and f.is_integer()):
                raise UnlearnError(f"{where} = {seed!r} is not an integer") from None
            seed = int(f)
    if not isinstance(seed, (int, np.integer)):
        raise UnlearnError(f"{where} = {seed!r} is not an integer")
    if not 0 <= int(seed) <= MAX_SEED:
        raise UnlearnError(f"{where} = {seed} is out of range; expected 0 <= seed <= 2**64 - 1")
    return int(seed)


def column_key(name: str) -> str:
    """A CSV column name as an item key: stripped, lower-cased, inner spaces as ``_``."""
    return "_".join(name.strip().lower().split())


def _bundled_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("unlearn_jax") / "data" / "prompt_sets"))


BUNDLED = ("nudity_cogvideox", "nudity-ring-a-bell", "safe-sora", "nudity_hunyuan", "face_cogvideox", "face_hunyuan",
           "face_ori")


def resolve_prompt_set(path_or_name) -> Path:
    """A CSV path as given, or the bundled published set of that name (`BUNDLED`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = str(path_or_name)
    if name.endswith(".csv"):
        name = name[:-4]
    if name in BUNDLED and "/" not in str(path_or_name):
        return _bundled_dir() / f"{name}.csv"
    raise UnlearnError(f"prompt set {path_or_name} does not exist (a CSV file, or a bundled set: "
                       f"{', '.join(BUNDLED)})")


def _rows(path: Path):
    """(first line number, fields) of every non-blank record, in file order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            out, last = [], 0
            for r in reader:
                start, last = last + 1, reader.line_num
                if any(c.strip() for c in r):
                    out.append((start, r))
            return out
    except UnicodeDecodeError as e:
        raise UnlearnError(f"prompt set {path} is not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UnlearnError(f"prompt set {path} is not a readable CSV file ({e})") from None


def load_prompt_set(path, *, limit: int | None = None, prompt_column: str = "prompt",
                    default_seed: int | None = DEFAULT_SEED) -> list[dict]:
    """Reads a prompt CSV (a path, or the name of a bundled published set) into items ``{"index", "name", "prompt", "seed", "seed_source", <other columns>}``.

    - ``index``: the 0-based row number (blank lines skipped).
    - ``name``: the ``case_number`` column (integers >= 0, unique) zero-padded to 4 digits
      (``"0001"``), else the row index zero-padded (``"0007"``); `unlearn-jax sample` names its
      videos so.
    - ``seed``: from the ``seed`` column, else ``evaluation_seed`` (``seed_source`` names it; the
      other one, if present, stays an ordinary column); a file with neither gets
      ``default_seed + index`` (``seed_source`` ``"default+index"``; `default_seed=None` makes that
      an error). Seeds are checked with `check_seed`.
    - other columns: their names lower-cased with spaces as ``_`` (ring-a-bell's ``normal prompt``
      -> ``normal_prompt``; the face sets' ``class`` is the identity), values stripped. A column
      named like an item key (e.g. ``prompt`` when `prompt_column` picks another one) is kept as
      ``csv_<key>``.

    Handles the published files' quirks: a UTF-8 byte-order mark, CRLF line ends, a leading
    unnamed index column (unnamed columns are dropped). `prompt_column` picks the column used as
    the prompt (e.g. ``"normal prompt"``); `limit` keeps the first rows. Problems raise a one-line
    UnlearnError naming the file and the line.
    """
    path = resolve_prompt_set(path)
    if limit is not None and int(limit) < 1:
        raise UnlearnError(f"prompt set limit must be >= 1, got {limit}")
    rows = _rows(path)
    if not rows:
        raise UnlearnError(f"prompt set {path} is empty; expected a CSV with a header line and a "
                           f"{prompt_column!r} column")
    _, head = rows[0]
    header = [column_key(h) for h in head]
    named = [h for h in header if h]
    if len(set(named)) != len(named):
        raise UnlearnError(f"prompt set {path} has repeated column names: {head}")
    pcol = column_key(prompt_column)
    if pcol not in header:
        raise UnlearnError(f"prompt set {path} has no {prompt_column!r} column (columns: {', '.join(named)})")
    seed_col = next((c for c in SEED_COLUMNS if c in header), None)
    if seed_col is None:
        if default_seed is None:
            raise UnlearnError(f"prompt set {path} has no seed column ({' or '.join(SEED_COLUMNS)}) "
                               "and no default seed")
        default_seed = check_seed(default_seed, "default seed")
    name_col = NAME_COLUMN if NAME_COLUMN in header else None

    items, names = [], {}
    for line, r in rows[1:]:
        where = f"prompt set {path}, line {line}"
        if len(r) != len(header):
            raise UnlearnError(f"{where}: {len(r)} fields for {len(header)} columns")
        rec = {k: v.strip() for k, v in zip(header, r) if k}
        index = len(items)
        prompt = rec.pop(pcol)
        if not prompt:
            raise UnlearnError(f"{where}: empty {prompt_column!r}")
        if seed_col is not None:
            seed, source = check_seed(rec.pop(seed_col), f"{where}: {seed_col}"), seed_col
        else:
            seed = check_seed(default_seed + index, f"{where}: default seed {default_seed} + row index {index}")
            source = "default+index"
        if name_col is not None:
            raw = rec[name_col]
            try:
                number = int(raw)
            except ValueError:
                raise UnlearnError(f"{where}: {name_col} {raw!r} is not an integer") from None
            if number < 0:
                raise UnlearnError(f"{where}: {name_col} {number} is negative")
            name = f"{number:04d}"
            if name in names:
                raise UnlearnError(f"{where}: {name_col} {name} repeats line {names[name]}")
            names[name] = line
        else:
            name = f"{index:04d}"
        item = {"index": index, "name": name, "prompt": prompt, "seed": seed, "seed_source": source}
        for k, v in rec.items():
            item[f"csv_{k}" if k in RESERVED_KEYS else k] = v
        items.append(item)
        if limit is not None and len(items) >= int(limit):
            break
    if not items:
        raise UnlearnError(f"prompt set {path} has a header but no prompts")
    return items


def prompt_set_name(path) -> str:
    """The name of a prompt set: its file name without the suffix."""
    return Path(path).stem


__all__ = ["BUNDLED", "DEFAULT_SEED", "MAX_SEED", "SEED_COLUMNS", "check_seed", "column_key", "load_prompt_set",
           "prompt_set_name", "resolve_prompt_set"]
