"""Message record keys and the conversion of model weights to and from Flower's ArrayRecord."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsynth.core.weights import model_tensors, split_model

__all__ = [
    "ARRAYS",
    "CONFIG",
    "HOSPITAL",
    "HOSPITALS_ASKED",
    "METRICS",
    "arrays_to_numpy",
    "number",
    "pack_model",
    "record_to_tensors",
    "tensors_to_record",
    "unpack_model",
]

# Record keys in messages between the ServerApp and the ClientApps.
ARRAYS, METRICS, CONFIG, HOSPITAL = "arrays", "metrics", "config", "hospital"
# In a training round's config: how many hospitals the round asked (whose copies are averaged).
HOSPITALS_ASKED = "hospitals-asked"


def number(value: object) -> float:
    """A record entry that must be a number (a metric, a round number), as a float.

    Raises
    ------
    TypeError
        Anything else (a list, a string, an array).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def pack_model(gen: torch.nn.Module, disc: torch.nn.Module | None = None) -> ArrayRecord:
    """Generator (and optionally discriminator) weights as one ArrayRecord."""
    return tensors_to_record(model_tensors(gen, disc))


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord to plain numpy arrays, by key."""
    return {k: v.numpy() for k, v in record.items()}


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays_to_numpy(record).items()}


def unpack_model(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ArrayRecord to (generator state, discriminator state); the latter may be empty."""
    return split_model(record_to_tensors(record))
