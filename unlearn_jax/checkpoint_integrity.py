"""Checksums of orbax checkpoint steps, so that a damaged checkpoint is never restored silently.

After a step is saved (and `wait_until_finished` returned), `write_manifest(step_dir)` records the
size and sha256 of every file of the step in `<step_dir>/unlearn_jax_checksums.json` (written
atomically). The manifest lives inside the step folder rather than beside it so that orbax's
retention (max_to_keep) deletes it with its step and a quarantined step keeps its own; orbax ignores
the extra file (it restores its items by name).

On resume, `latest_good_step(checkpoints_dir)` walks the steps from the newest and returns the first
whose files match their manifest, with a message naming every newer step it skipped and why.
`quarantine(step_dir)` moves a skipped step out of orbax's sight (orbax lists integer-named folders
only), so that the step can be saved again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from unlearn_jax import exit_codes
from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import UnlearnError

MANIFEST_NAME = "unlearn_jax_checksums.json"
_FORMAT = "unlearn-jax checkpoint checksums"


class CheckpointCorrupt(UnlearnError):
    """No checkpoint of the run passes its checksums."""

    exit_code = exit_codes.CHECKPOINT_CORRUPT


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path) -> dict[str, Path]:
    """Every file (and link, not followed) of the step by relative posix path; the manifest left out."""
    out = {}
    for root, dirs, files in os.walk(step_dir, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            rel = p.relative_to(step_dir).as_posix()
            if rel != MANIFEST_NAME:
                out[rel] = p
    return dict(sorted(out.items()))


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Writes the checksums of every file of a completed step folder; returns the manifest's path."""
    step_dir = Path(step_dir)
    files = {}
    for rel, p in _files(step_dir).items():
        if p.is_symlink():
            raise UnlearnError(f"{p}: a checkpoint step holds a symbolic link; checkpoints are plain files")
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    path = step_dir / MANIFEST_NAME
    with atomic_file(path, "w") as f:
        json.dump({"format": _FORMAT, "files": files}, f, indent=1)
        f.write("\n")
    return path


@dataclasses.dataclass(frozen=True)
class Verification:
    step_dir: Path
    status: str  # "ok" | "unverified" (no manifest) | "corrupt"
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __bool__(self) -> bool:
        return self.ok

    @property
    def reason(self) -> str:
        if self.status == "unverified":
            return f"no {MANIFEST_NAME}"
        shown = "; ".join(self.problems[:3])
        return shown + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else "")


def verify(step_dir: str | os.PathLike) -> Verification:
    """Checks every file of a step folder against its manifest (missing, extra, resized or changed files)."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST_NAME
    if not step_dir.is_dir():
        return Verification(step_dir, "corrupt", (f"{step_dir} is not a folder",))
    if not path.exists():
        return Verification(step_dir, "unverified")
    try:
        meta = json.loads(path.read_text())
        expected = meta["files"] if meta.get("format") == _FORMAT else None
        if not isinstance(expected, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, AttributeError):
        return Verification(step_dir, "corrupt", (f"{MANIFEST_NAME} is unreadable",))
    problems = []
    found = _files(step_dir)
    for rel in expected:
        if rel not in found:
            problems.append(f"{rel} is missing")
    for rel, p in found.items():
        want = expected.get(rel)
        if want is None:
            problems.append(f"{rel} is not in the manifest")
        elif p.is_symlink():
            problems.append(f"{rel} is a link")
        else:
            try:
                if p.stat().st_size != want.get("size"):
                    problems.append(f"{rel} has {p.stat().st_size} bytes, {want.get('size')} were written")
                elif file_sha256(p) != want.get("sha256"):
                    problems.append(f"{rel}: sha256 differs from the one written")
            except OSError as e:
                problems.append(f"{rel} cannot be read ({e.strerror})")
    return Verification(step_dir, "corrupt" if problems else "ok", tuple(problems))


def require_valid(step_dir: str | os.PathLike) -> None:
    """Raises CheckpointCorrupt (one line) when a step with a manifest does not match it."""
    v = verify(step_dir)
    if v.status == "corrupt":
        raise CheckpointCorrupt(f"{v.step_dir}: checkpoint is corrupt ({v.reason})")


def step_dirs(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """The step folders orbax would list (integer names), by step, oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return {}
    steps = {int(p.name): p for p in d.iterdir() if p.name.isdigit() and p.is_dir() and not p.is_symlink()}
    return dict(sorted(steps.items()))


def check_steps(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Verification]]:
    """Every step's verification, newest first."""
    return [(s, verify(p)) for s, p in sorted(step_dirs(checkpoints_dir).items(), reverse=True)]


def latest_good_step(checkpoints_dir: str | os.PathLike) -> tuple[int | None, str | None]:
    """(the newest step whose files match their checksums, a message or None).

    A step without a manifest is taken unverified only when no step has one (checkpoints written
    before checksums existed); otherwise it is skipped (the run stopped between the save and the
    manifest, so the previous step is the last one known good). No steps: (None, None). No good
    step: (None, a message naming each step and what is wrong with it).
    """
    steps = step_dirs(checkpoints_dir)
    if not steps:
        return None, None
    legacy = not any((p / MANIFEST_NAME).exists() for p in steps.values())
    skipped = []
    for step, v in check_steps(checkpoints_dir):
        if v.ok or (legacy and v.status == "unverified"):
            if not skipped:
                note = None
                if not v.ok:
                    note = (f"{checkpoints_dir}: checkpoints written without checksums; step {step} is restored "
                            "unverified")
                return step, note
            what = "; ".join(skipped)
            return step, (f"{checkpoints_dir}: skipped {what}; resuming from step {step}, the newest good "
                          "checkpoint")
        kind = "corrupt" if v.status == "corrupt" else "unverified"
        skipped.append(f"step {v.step_dir.name} ({kind}: {v.reason})")
    return None, f"{checkpoints_dir}: no good checkpoint: {'; '.join(skipped)}"


def quarantine(step_dir: str | os.PathLike) -> Path:
    """Renames a bad step folder to `<step>.corrupt` (or `.corrupt-N`), which orbax no longer lists;
    nothing is deleted. Returns the new path."""
    step_dir = Path(step_dir)
    target = step_dir.with_name(f"{step_dir.name}.corrupt")
    n = 1
    while target.exists():
        target = step_dir.with_name(f"{step_dir.name}.corrupt-{n}")
        n += 1
    os.rename(step_dir, target)
    return target


__all__ = ["MANIFEST_NAME", "CheckpointCorrupt", "Verification", "check_steps", "file_sha256", "latest_good_step",
           "quarantine", "require_valid", "step_dirs", "verify", "write_manifest"]
