"""The edges of a command-line tool: its output folder checked before any work, every error one line
with its exit code (`unlearn_jax.exit_codes`).

    return run_tool(lambda: convert(args))          # in a tool's main()
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable

from unlearn_jax import exit_codes
from unlearn_jax.atomic import check_output_dir
from unlearn_jax.errors import UnlearnError


def _same_or_nested(a: Path, b: Path) -> bool:
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([ra, rb]) in (ra, rb)


def check_output(out, overwrite: bool, inputs: Iterable = (), flag: str = "--overwrite") -> str:
    """Refuses (one line) an output folder that would replace something not ours (`check_output_dir`),
    or that is, holds or lies inside one of the `inputs` (None entries skipped)."""
    out = Path(out)
    for src in inputs:
        if src is not None and Path(src).exists() and _same_or_nested(out, Path(src)):
            raise UnlearnError(f"{out}: the output would replace or sit inside the input {src}; choose another "
                               "output path")
    return check_output_dir(out, overwrite, flag=flag)


def run_tool(body: Callable[[], int | None]) -> int:
    """Runs `body`; a user's mistake or a failing disk ends it with one line on stderr and its exit code
    (UnlearnError 2, OSError 2 or 74, Ctrl-C 130). Unforeseen errors keep their traceback (a bug)."""
    try:
        code = body()
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.for_exception(e)
    except OSError as e:
        print(f"error: {exit_codes.describe_os_error(e)}", file=sys.stderr)
        return exit_codes.for_exception(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.SIGINT
    return exit_codes.OK if code is None else int(code)


__all__ = ["check_output", "run_tool"]
