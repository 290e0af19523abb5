"""Writes that never leave a half-written file or folder behind: write to a temporary name, then rename.

Outputs never replace what a user owns: `atomic_dir(path, overwrite=False|True)` / `write_dir` refuse
an existing path this project did not write (a marker inside every folder it writes says so), and
`safe_child` refuses a path that a link leads out of its root.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from unlearn_jax.errors import UnlearnError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, briefly
    affecting files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, *, root: str | os.PathLike | None = None,
               flag: str = "overwrite=True") -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path`; on success it replaces `path` as a whole.

    On an exception the temporary folder is removed and an existing `path` is left untouched.

    overwrite says what may be replaced:
      False a new output: `path` must be absent or an empty folder.
      True  our own output: `path` may also be a folder this project wrote (`is_ours`).
    `path` is checked (`check_output_dir`, one-line UnlearnError) before the body runs and again
    before the swap, and the written folder holds the `MARKER` listing its entries.
    root: `path` must resolve inside it (nothing is written through a link out of it).
    flag: how the caller's user asks for an overwrite (a command's "--overwrite"), for the messages.
    """
    path = Path(path)
    check_output_dir(path, overwrite, root, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be a normal folder
    try:
        yield tmp
        _write_marker(tmp)
        check_output_dir(path, overwrite, root, flag)  # again: the body may have run for hours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Opens a temporary file beside `path` for writing; renames it over `path` once closed cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should be a normal file
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Outputs that never replace what a user owns
# --------------------------------------------------------------------------------------------
# Every folder written with `atomic_dir(path, overwrite=False|True)` holds this marker: a JSON list of
# the entries written, so that `--overwrite` later replaces that folder only while it holds nothing
# else (a file a user dropped into it is never deleted with it).
MARKER = ".unlearn-jax"
_MARKER_FORMAT = "unlearn-jax output"

# Folders written before the marker existed that only this project writes, recognised by their
# layout (the names mirror loading.ORBAX_MARKER and eraser_io's CONFIG_NAME / WEIGHTS_NAME / FORMAT;
# tests/test_reliability_outputs.py checks that they agree). Diffusers and T2VUnlearning folders
# are not listed: without a marker they cannot be told from a user's download.
_LEGACY_LAYOUTS = (
    ("unlearn_jax_checkpoint.json", None, {"unlearn_jax_checkpoint.json", "params"}),
    ("eraser_config.json", ("format", "unlearn-jax"), {"eraser_config.json", "erasers.safetensors"}),
)


def _entries(folder: Path) -> list[str]:
    """Relative paths (posix) of every file and link under `folder`, links not followed, the marker left out."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def _write_marker(folder: Path):
    with open(folder / MARKER, "w") as f:
        json.dump({"format": _MARKER_FORMAT, "entries": _entries(folder)}, f, indent=1)
        f.write("\n")


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _ours(path: Path) -> tuple[bool, str]:
    """(True, "") when the existing folder `path` is an output of ours holding nothing else; else
    (False, why not) for the refusal message."""
    marker = path / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            meta = json.loads(marker.read_text())
            written = set(meta["entries"]) if meta.get("format") == _MARKER_FORMAT else None
        except (OSError, ValueError, KeyError, TypeError):
            written = None
        if written is None:
            return False, f"its {MARKER} marker cannot be read"
        extra = [e for e in _entries(path) if e not in written]
        if extra:
            return False, f"it holds files unlearn-jax did not write ({_few(extra)})"
        return True, ""
    names = {p.name for p in path.iterdir()}
    for required, key_value, allowed in _LEGACY_LAYOUTS:
        if required not in names or not (path / required).is_file():
            continue
        if key_value is not None:
            try:
                if json.loads((path / required).read_text()).get(key_value[0]) != key_value[1]:
                    continue
            except (OSError, ValueError, AttributeError):
                continue
        extra = sorted(names - allowed)
        if extra:
            return False, f"it holds files unlearn-jax did not write ({_few(extra)})"
        if any((path / e).is_symlink() for e in _entries(path)):
            return False, "it holds symbolic links, which unlearn-jax never writes"
        return True, ""
    return False, f"unlearn-jax did not write it (no {MARKER} marker)"


def is_ours(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder this project wrote (marker or known layout) holding nothing else."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and _ours(path)[0]


def safe_child(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """`root / relative`, refused (one line) when its resolved location is not inside `root`'s: a link
    such as `workdir/export -> /elsewhere` is never written through. Returns the unresolved path."""
    child = Path(root) / relative
    _check_inside(root, child)
    return child


def _check_inside(root, path):
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnlearnError(f"{path}: resolves to {real}, outside {root}; unlearn-jax does not write through a "
                           f"link out of its folder (remove the link, or choose another folder)")


def check_output_dir(path: str | os.PathLike, overwrite: bool, root: str | os.PathLike | None = None,
                     flag: str = "--overwrite") -> str:
    """Whether a folder may be written at `path`, without touching it; raises a one-line UnlearnError if not.

    overwrite=False: `path` must be absent or an empty folder. overwrite=True: it may also be an
    output of ours (see `is_ours`); anything else (a file, a link, a user's folder) is refused.
    root: `path` must resolve inside it (`safe_child`). flag: the option named in the messages.
    Returns "absent", "empty" or "ours".
    """
    path = Path(path)
    if root is not None:
        _check_inside(root, path)
    if path.is_symlink():
        raise UnlearnError(f"{path}: is a symbolic link (to {os.readlink(path)}); unlearn-jax does not replace "
                           "links or write through them: remove it or give the real folder")
    if not path.exists():
        return "absent"
    if not path.is_dir():
        raise UnlearnError(f"{path}: exists and is a file, not a folder unlearn-jax wrote; remove it or choose "
                           f"another output path ({flag} replaces only folders unlearn-jax wrote)")
    try:
        empty = not any(path.iterdir())
    except OSError as e:
        raise UnlearnError(f"{path}: cannot be read ({e.strerror})") from None
    if empty:
        return "empty"
    ours, why = _ours(path)
    if not ours:
        raise UnlearnError(f"{path}: exists and {why}; it is not replaced: choose another output path or move "
                           f"it away ({flag} replaces only what unlearn-jax wrote)")
    if not overwrite:
        raise UnlearnError(f"{path}: exists (an output of unlearn-jax); pass {flag} to replace it, or choose "
                           "another output path")
    return "ours"


def write_dir(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool,
              root: str | os.PathLike | None = None, flag: str = "--overwrite") -> Path:
    """Runs `write(folder)` (any function that writes a whole folder at the path it is given, such as
    `save_transformer(model, .)` or `save_erasers(., ...)`) and puts the result at `path` under
    `check_output_dir`'s rule, marked as ours. `path` is refused before `write` runs."""
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite, root=root, flag=flag) as tmp:
        inner = tmp / ".payload"
        write(inner)
        if not inner.is_dir():
            raise RuntimeError(f"{write!r} wrote no folder at the path it was given")
        for child in inner.iterdir():
            os.replace(child, tmp / child.name)
        inner.rmdir()
    return path
