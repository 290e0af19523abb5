"""Refusal of weights that are not floating point, before anything is loaded.

The loaders cast every tensor into the model's float dtype, so an integer tensor (a quantised or
mis-converted checkpoint, an index saved by mistake) would load silently as different weights.
`refuse_non_floating(path)` reads only the headers (safetensors) or our checkpoint description
(orbax) of a transformer folder, a pipeline folder or an eraser folder and refuses, in one line,
any tensor that is not float16 / bfloat16 / float32 / float64. Eraser `.pt` files are checked by
their loader (`torch.load(weights_only=True)`, floating tensors only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from unlearn_jax.errors import UnlearnError

FLOATING = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}


def _safetensors_dtypes(folder: Path, prefer: str | None) -> dict[str, str]:
    from unlearn_jax.conversion import SafetensorsReader

    reader = SafetensorsReader(folder, prefer=prefer)
    try:
        out = {}
        for key in reader.keys():
            try:
                dt = reader.dtype(key)
            except (KeyError, TypeError):
                out[key] = "a dtype unlearn-jax does not read"
                continue
            if dt not in FLOATING:
                out[key] = dt.name
        return out
    finally:
        reader.close()


def _orbax_dtypes(folder: Path) -> dict[str, str]:
    from unlearn_jax.families import ORBAX_MARKER

    try:
        stored = json.loads((folder / ORBAX_MARKER).read_text()).get("dtypes", {})
    except (OSError, ValueError, AttributeError):
        return {}  # the loader says what is wrong with the description
    out = {}
    for key, name in stored.items() if isinstance(stored, dict) else ():
        try:
            dt = np.dtype(name)
        except TypeError:
            try:
                dt = np.dtype(getattr(ml_dtypes, str(name)))
            except (AttributeError, TypeError):
                out[key] = str(name)
                continue
        if dt not in FLOATING:
            out[key] = dt.name
    return out


def non_floating(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> dtype of every tensor that is not floating point in a transformer folder (diffusers
    or orbax, or a pipeline's transformer/) or an eraser folder. Missing or unreadable folders give {}:
    the loaders report those with their own messages."""
    from unlearn_jax import eraser_io
    from unlearn_jax.families import ORBAX_MARKER
    from unlearn_jax.loading import WEIGHTS_NAME, resolve_transformer_dir

    path = Path(path)
    if eraser_io.is_eraser_folder(path):
        if (path / eraser_io.WEIGHTS_NAME).is_file():
            return _safetensors_dtypes(path, eraser_io.WEIGHTS_NAME)
        if (path / eraser_io.PUBLISHED_SAFETENSORS).is_file():
            return _safetensors_dtypes(path, eraser_io.PUBLISHED_SAFETENSORS)
        return {}
    try:
        folder = resolve_transformer_dir(path)
    except UnlearnError:
        return {}
    if (folder / ORBAX_MARKER).exists():
        return _orbax_dtypes(folder)
    if not any(folder.glob("*.safetensors")):
        return {}
    return _safetensors_dtypes(folder, WEIGHTS_NAME)


def refuse_non_floating(path: str | os.PathLike, what: str = "weights") -> None:
    """One-line UnlearnError when a folder holds integer (or other non-float) tensors."""
    bad = non_floating(path)
    if not bad:
        return
    key, dt = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UnlearnError(f"{path}: {what} tensor {key} is {dt}{more}; {what} must be floating point (float32, "
                       "bfloat16 or float16): integer tensors would be cast silently into different values")


__all__ = ["FLOATING", "non_floating", "refuse_non_floating"]
