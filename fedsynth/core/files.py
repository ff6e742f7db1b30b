"""Atomic file writes (a temporary file beside the target, fsynced, then renamed over it)
and the one JSON writer, with its rule for numbers JSON has not: NaN and infinities are null."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_open", "to_json", "write_json_atomic", "write_text_atomic"]


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, suffix: str = "") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    fsynced and renamed over ``path``, so a crash never leaves a half-written file. On an
    error the temporary file is removed and ``path`` is untouched.

    ``mode`` is "w" (text) or "wb" (binary); ``suffix`` ends the temporary name (numpy
    appends ``.npz`` to names without it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def to_json(value: Any) -> Any:
    """``value`` as strict JSON can hold it: NaN and infinities become None (null), numpy
    scalars and arrays plain numbers and lists, paths strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(
    path: str | Path, payload: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Write ``payload`` as strict JSON (through :func:`to_json`), atomically, ending in a newline."""
    write_text_atomic(
        path, json.dumps(to_json(payload), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    )
