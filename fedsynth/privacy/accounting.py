"""Privacy accounting: the noise a hospital's DP-SGD needs for a budget, and the epsilon a
(sigma, q, steps) history has spent, by Opacus's RDP (and PRV) accountants.

**Privacy unit.** Each DP step Poisson-samples *privacy units* (patients where the slice
set has real patient ids, else slices) with rate q, and takes one random slice of each
sampled patient (:class:`~fedsynth.privacy.sampling.PatientSampler`). Adding or removing
one patient changes at most one clipped per-sample gradient of the sum, so the
subsampled Gaussian mechanism's guarantee is per patient.

**Accounting across rounds.** The (sigma, q, steps) history lives in the hospital's
ledger (:mod:`fedsynth.privacy.ledger`), so epsilon covers every step of every round,
survives a client restart and a resumed run (a round whose update was lost still
counts: it was spent).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

# Opacus (and the SciPy it pulls in: about 3 s of every import on 2 cores) is imported by the
# functions that account, so a run without DP never loads it.
if TYPE_CHECKING:
    from fedsynth.runs.config import DPConfig

__all__ = ["PRV_MAX_EPSILON", "PrivacyError", "PrivacyPlan", "default_delta", "epsilon_for", "plan_privacy"]


class PrivacyError(ValueError):
    """DP cannot be applied as configured (unsupported layers, impossible budget)."""


def default_delta(units: int) -> float:
    """min(1e-5, 1/(10 N)) for N privacy units."""
    return min(1e-5, 1.0 / (10 * max(units, 1)))


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP parameters a hospital trains with for the whole run."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    expected_batch: int
    units: int
    unit: str  # "patient" or "slice"
    planned_steps: int
    target_epsilon: float  # 0: no budget


def plan_privacy(dp: DPConfig, *, units: int, unit: str, batch_size: int, planned_steps: int) -> PrivacyPlan:
    """Choose sigma for the planned steps (or take the configured one).

    Raises
    ------
    PrivacyError
        Too few privacy units, or no sigma reaches the target.
    """
    if units < 2:
        raise PrivacyError(f"DP needs at least 2 {unit}s at the hospital, found {units}")
    sample_rate = min(1.0, batch_size / units)
    delta = dp.delta or default_delta(units)
    sigma = dp.noise_multiplier
    if sigma <= 0:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sigma = get_noise_multiplier(
                    target_epsilon=dp.target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=planned_steps,
                    accountant="rdp",
                    epsilon_tolerance=0.005,
                )
        except ValueError as err:
            raise PrivacyError(f"dp.target-epsilon {dp.target_epsilon}: cannot be met ({err})") from None
        # Opacus returns a sigma whose epsilon is within tolerance *below* the target;
        # check and nudge up so the final epsilon never exceeds it.
        while epsilon_for([(sigma, sample_rate, planned_steps)], delta) > dp.target_epsilon:
            sigma *= 1.01
    return PrivacyPlan(
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        delta=delta,
        max_grad_norm=dp.max_grad_norm,
        expected_batch=max(1, round(sample_rate * units)),
        units=units,
        unit=unit,
        planned_steps=planned_steps,
        target_epsilon=dp.target_epsilon,
    )


# Above this RDP epsilon the PRV accountant is not run: its discretisation grows with
# epsilon (6 GB and 40 s at epsilon ~1100), and a tighter bound on a meaningless
# guarantee helps nobody. Reported as inf (null in the ledger).
PRV_MAX_EPSILON = 100.0


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a (sigma, q, steps) history by Opacus's RDP or PRV accountant.

    PRV is computed with an error of max(0.01, epsilon / 200) and only where the RDP
    epsilon is at most ``PRV_MAX_EPSILON`` (else inf).
    """
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp = RDPAccountant()
        rdp.history = history
        epsilon = float(rdp.get_epsilon(delta=delta))
        if accountant == "rdp":
            return epsilon
        if epsilon > PRV_MAX_EPSILON:
            return math.inf
        prv = PRVAccountant()
        prv.history = history
        return float(prv.get_epsilon(delta=delta, eps_error=max(0.01, epsilon / 200)))
