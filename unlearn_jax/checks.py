"""Argument checks shared by the commands and the library, each failing with one line naming the value."""
from __future__ import annotations

import math

import numpy as np

from unlearn_jax.errors import UnlearnError


def positive_int(name: str, value, lo: int = 1) -> int:
    """`value` as an int >= `lo` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise UnlearnError(f"{name} = {value!r} is invalid; expected an integer >= {lo}")
    return int(value)


def finite_number(name: str, value) -> float:
    """`value` as a finite float (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
        raise UnlearnError(f"{name} = {value!r} is invalid; expected a finite number")
    return float(value)
