"""An output folder a command writes results into under fixed names: never a file or a folder of the user's,
and results reused on a rerun only when they were made with the same settings (`unlearn-jax eval`, `attack`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import UnlearnError


def check_results_dir(out: Path, ours: Sequence[str], *, flag: str, command: str):
    """Refuses `out` when it is a file, or a folder holding files but none of `ours` (what an earlier run of
    `command` there wrote first)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any((out / n).is_file() for n in ours))):
        raise UnlearnError(f"{flag} {out} exists and holds files that unlearn-jax {command} did not write; choose an "
                           "empty or new folder")


def claim_results_dir(out: Path, settings_file: str, settings: dict, overwrite: bool, *, flag: str, command: str,
                      results: Sequence[str]):
    """Records `settings` in out/settings_file. Other settings than the recorded ones are refused, or with
    `overwrite` the earlier `results` folders (this command's) are removed first."""
    out = Path(out)
    path = out / settings_file
    wanted = json.loads(json.dumps(settings))
    check_results_dir(out, [settings_file], flag=flag, command=command)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != wanted:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
                raise UnlearnError(f"{flag} {out} holds results made with other settings ({', '.join(changed)}); "
                                   f"use another {flag}, or --overwrite to start over")
            for name in results:
                shutil.rmtree(out / name, ignore_errors=True)
    with atomic_file(path, "w") as f:
        json.dump(wanted, f, indent=1)
        f.write("\n")
