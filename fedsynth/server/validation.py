"""Update validation: a malformed hospital update is rejected, never averaged in."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["check_update"]


def check_update(
    arrays: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    num_examples: object,
) -> str | None:
    """Why an update cannot be averaged, or None when it can.

    Checks that the update has exactly the global model's tensors, each with its shape,
    a floating dtype and only finite values, and that its weight (``num-examples``) is
    a positive finite number.
    """
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        return f"tensors do not match the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, shape in expected_shapes.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected floating point"
        if not np.isfinite(value).all():
            return f"{key} contains NaN or infinite values"
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return f"num-examples is {num_examples!r}, expected a number"
    if not math.isfinite(num_examples) or num_examples <= 0:
        return f"num-examples is {num_examples}, expected a positive number"
    return None
