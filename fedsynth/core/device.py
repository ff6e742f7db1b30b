"""Pick the compute device: CUDA when present and asked for, CPU always works."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_for", "pick_device"]


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` gives CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Raises
    ------
    RuntimeError
        ``cuda`` was asked for on a machine without one.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is available (use auto or cpu)")
    return torch.device("cpu")


def autocast_for(device: torch.device, setting: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a training step: bfloat16 autocast on CUDA with
    ``auto`` or ``on``, on the CPU only with ``on`` (slower there: for testing the path),
    otherwise none. bfloat16 keeps float32's range, so no loss scaling is needed."""
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
