"""Pick the compute device: CUDA when present and asked for, CPU always works."""

from __future__ import annotations

import torch

__all__ = ["pick_device"]


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
