"""Reading the small JSON files of model folders, with one-line errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from unlearn_jax.errors import UnlearnError


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """The JSON object in `path`; an unreadable file or another JSON value is an `UnlearnError`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnlearnError(f"{path}: not a readable {what} ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(d, dict):
        raise UnlearnError(f"{path}: not a {what} (expected a JSON object)")
    return d
