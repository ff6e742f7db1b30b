"""Update validation: a malformed hospital update is rejected, never averaged in."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

__all__ = ["check_update", "read_update", "relative_update_norm"]


def read_update(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a hospital's reply as plain numpy arrays.

    Flower deserialises each array with ``np.load(..., allow_pickle=False)``: an array
    that would need pickle (object dtype) or is in another serialisation raises here
    instead of running any code.

    Raises
    ------
    ValueError
        An array that is not a plain numeric numpy array.
    """
    out = {}
    for key, array in record.items():
        try:
            value = array.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed update
            raise ValueError(f"{key} is not a plain numpy array ({type(err).__name__}: {err})") from None
        if value.dtype.hasobject:
            raise ValueError(f"{key} has dtype {value.dtype}, expected plain numbers")
        out[key] = value
    return out


def relative_update_norm(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """||update - global||_2 / ||global||_2 over every tensor both hold (float64)."""
    diff = total = 0.0
    for key, base in current.items():
        if key in arrays:
            b = base.astype(np.float64)
            d = arrays[key].astype(np.float64) - b
            diff += float(np.sum(d * d))
            total += float(np.sum(b * b))
    return math.sqrt(diff) / max(math.sqrt(total), 1e-12)


def check_update(
    arrays: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    num_examples: object,
    *,
    expected_dtypes: Mapping[str, np.dtype] | None = None,
    current: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float = 0.0,
) -> str | None:
    """Why an update cannot be averaged, or None when it can.

    Checks that the update has exactly the global model's tensors, each with its shape
    and dtype (any floating dtype when ``expected_dtypes`` is not given) and only finite
    values; that its weight (``num-examples``) is a positive finite number; and, when
    ``max_update_norm`` > 0 and the global weights ``current`` are given, that the update
    moves the model by at most that much relative to the model's own norm
    (``relative_update_norm``): a hospital sending 1000x its weights is refused.
    """
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        return f"tensors do not match the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, shape in expected_shapes.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if expected_dtypes is not None and key in expected_dtypes:
            if value.dtype != expected_dtypes[key]:
                return f"{key} has dtype {value.dtype}, expected {np.dtype(expected_dtypes[key])}"
        elif not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected floating point"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"{key} contains NaN or infinite values"
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return f"num-examples is {num_examples!r}, expected a number"
    if not math.isfinite(num_examples) or num_examples <= 0:
        return f"num-examples is {num_examples}, expected a positive number"
    if max_update_norm > 0 and current:
        ratio = relative_update_norm(arrays, current)
        if ratio > max_update_norm:
            return (
                f"update norm is {ratio:.3g}x the global model's, above federation.max-update-norm "
                f"{max_update_norm:g}"
            )
    return None
