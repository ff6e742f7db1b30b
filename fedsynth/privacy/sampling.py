"""Which real slices a DP step reads: Poisson sampling of privacy units, from randomness
nobody can reproduce."""

from __future__ import annotations

import secrets

import numpy as np
import torch

__all__ = ["PatientSampler", "secure_generator"]


class PatientSampler:
    """Poisson sampling of privacy units, one random slice per sampled unit.

    ``unit_ids`` has one id per slice; slices sharing an id are one unit (a patient).
    """

    def __init__(self, unit_ids: np.ndarray, sample_rate: float, generator: torch.Generator) -> None:
        order = np.argsort(unit_ids, kind="stable")
        _, starts, counts = np.unique(unit_ids[order], return_index=True, return_counts=True)
        self.order = torch.from_numpy(order)
        self.starts = torch.from_numpy(starts)
        self.counts = torch.from_numpy(counts)
        self.sample_rate = sample_rate
        self.generator = generator

    @property
    def units(self) -> int:
        return len(self.starts)

    def sample(self) -> torch.Tensor:
        """Indices of the slices in this step's batch (possibly empty)."""
        chosen = torch.rand(self.units, generator=self.generator) < self.sample_rate
        starts, counts = self.starts[chosen], self.counts[chosen]
        offset = (torch.rand(len(starts), generator=self.generator) * counts).long().clamp_max(counts - 1)
        return self.order[starts + offset]


def secure_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy, never stored: for
    the DP noise and the Poisson sampling, which a seed derived from the run config
    would let the server (or anyone with the config) reproduce and subtract."""
    return torch.Generator().manual_seed(secrets.randbits(63))
