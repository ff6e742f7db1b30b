"""Checkpoints: tensors only (safetensors), written atomically, loaded without running code."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedsynth.core.files import atomic_open

__all__ = [
    "CheckpointError",
    "file_sha256",
    "load_checkpoint",
    "save_checkpoint",
    "save_torch_atomic",
    "load_torch_tensors",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not a safetensors file."""


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with string ``metadata`` to ``path`` atomically: the file is
    either the old one or the complete new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata.

    Raises
    ------
    CheckpointError
        Missing or unreadable file (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None


def save_torch_atomic(path: str | Path, obj: object) -> Path:
    """``torch.save`` an object of tensors and plain values (optimizer state) atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return path


def load_torch_tensors(path: str | Path) -> object:
    """Load what ``save_torch_atomic`` wrote, refusing anything but tensors and plain
    values (``weights_only=True``: a tampered file cannot run code)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be loaded as tensors ({err})") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
