"""The one parser of dtype arguments ("bfloat16", "bf16", jnp.bfloat16, np.dtype(...)) used everywhere."""
from __future__ import annotations

import numpy as np

from unlearn_jax.errors import UnlearnError

# Names users may write -> canonical names. Only floating types: weights and compute.
_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
            "float16": "float16", "fp16": "float16"}
NAMES = ("float32", "bfloat16", "float16")
ALIASES = tuple(_ALIASES)  # every name `dtype_name` / `as_dtype` read


def dtype_name(dtype, what: str = "dtype") -> str:
    """The canonical name ("float32" | "bfloat16" | "float16") of a dtype given by name or object."""
    if not isinstance(dtype, str):
        try:
            import jax.numpy as jnp

            dtype = jnp.dtype(dtype).name
        except TypeError:
            raise UnlearnError(f"{what} = {dtype!r} is invalid; expected one of {', '.join(NAMES)}") from None
    if dtype not in _ALIASES:
        raise UnlearnError(f"{what} = {dtype!r} is invalid; expected one of {', '.join(NAMES)}")
    return _ALIASES[dtype]


def as_dtype(dtype, what: str = "dtype") -> np.dtype | None:
    """None stays None ("keep the checkpoint's"); anything else becomes a numpy dtype (bf16 via ml_dtypes)."""
    if dtype is None:
        return None
    import jax.numpy as jnp

    if isinstance(dtype, str) and dtype not in _ALIASES:
        raise UnlearnError(f"{what} {dtype!r} is not one of {', '.join(sorted(_ALIASES))}")
    return np.dtype(jnp.dtype(dtype_name(dtype, what)))
