"""A hospital's privacy ledger: every (sigma, q, steps) it has spent on its data, the plan of
each run, kept on disk across rounds, restarts and runs, and what it reports of them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsynth.core.files import write_json_atomic
from fedsynth.privacy.accounting import PrivacyPlan, epsilon_for, plan_privacy

if TYPE_CHECKING:
    from fedsynth.runs.config import DPConfig

__all__ = ["PrivacyState", "plan_for_run", "privacy_report", "sigma_for_remaining"]

log = logging.getLogger(__name__)


@dataclass
class PrivacyState:
    """A hospital's privacy history, kept in its state folder (``privacy.json``)."""

    history: list[tuple[float, float, int]] = field(default_factory=list)
    delta: float = 0.0
    unit: str = "slice"
    units: int = 0
    # Per run (its state folder's name): the [sigma, q] it was planned with.
    plans: dict[str, list[float]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def add(self, sigma: float, q: float, steps: int) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            s, q0, n = self.history[-1]
            self.history[-1] = (s, q0, n + steps)
        else:
            self.history.append((sigma, q, steps))

    def epsilon(self, accountant: str = "rdp", extra: tuple[float, float, int] | None = None) -> float:
        history = self.history + ([extra] if extra else [])
        return epsilon_for(history, self.delta, accountant)

    @classmethod
    def load(cls, path: Path) -> PrivacyState:
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            history=[tuple(h) for h in raw["history"]],
            delta=raw["delta"],
            unit=raw["unit"],
            units=raw["units"],
            plans=raw.get("plans", {}),
        )

    @staticmethod
    @contextlib.contextmanager
    def lock(path: Path) -> Iterator[None]:
        """Hold an exclusive lock on the ledger while reading, charging and writing it:
        two runs training on the same data at once must not lose each other's charges."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))


def plan_for_run(
    dp: DPConfig,
    privacy: PrivacyState,
    *,
    run_key: str,
    units: int,
    unit: str,
    batch_size: int,
    planned_steps: int,
) -> PrivacyPlan:
    """A hospital's DP plan for one run (``run_key``) on the data this ledger covers.

    Sigma is chosen once, at the run's first round, and kept (in ``privacy.plans``), so
    extending a run later cannot quietly lower the noise. With a target and spending
    from earlier runs on the same data, sigma is chosen so that the earlier spending plus
    this run's ``planned_steps`` stay within the target.

    Raises
    ------
    PrivacyError
        Too few privacy units, or no sigma reaches the target.
    """

    def plan_with(sigma: float | None) -> PrivacyPlan:
        config = dp if sigma is None else dp.model_copy(update={"noise_multiplier": sigma})
        return plan_privacy(
            config, units=units, unit=unit, batch_size=batch_size, planned_steps=planned_steps
        )

    kept = privacy.plans.get(run_key)
    if kept is None and privacy.history and not privacy.plans:  # a ledger written by fedsynth 0.1.0
        kept = list(privacy.history[0][:2])
    if kept is not None:
        sigma, q = kept
        return replace(plan_with(sigma), sample_rate=q, delta=privacy.delta)
    if privacy.history and dp.target_epsilon > 0 and dp.noise_multiplier == 0:
        plan = plan_with(1.0)  # for q; sigma follows from what earlier runs left
        sigma = sigma_for_remaining(privacy, plan.sample_rate, planned_steps, dp.target_epsilon)
        plan = replace(plan, noise_multiplier=sigma, delta=privacy.delta)
    else:
        plan = plan_with(None)
        if privacy.history:
            plan = replace(plan, delta=privacy.delta)
    if not privacy.history:
        privacy.delta, privacy.unit, privacy.units = plan.delta, plan.unit, plan.units
    privacy.plans[run_key] = [plan.noise_multiplier, plan.sample_rate]
    return plan


def sigma_for_remaining(privacy: PrivacyState, q: float, steps: int, target: float) -> float:
    """The smallest sigma (to 1%) whose ``steps`` more steps keep the ledger's epsilon
    within ``target``; 1000 if none does (the hospital will then decline)."""

    def fits(sigma: float) -> bool:
        return privacy.epsilon(extra=(sigma, q, steps)) <= target

    low, high = 0.3, 1000.0
    if not fits(high):
        return high
    if fits(low):
        return low
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def privacy_report(privacy: PrivacyState, plan: PrivacyPlan) -> dict[str, Any]:
    """What the hospital tells the server about its privacy spending."""
    return {
        "dp-epsilon": privacy.epsilon("rdp"),
        "dp-epsilon-prv": _prv(privacy),
        "dp-delta": privacy.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": privacy.steps,
        "dp-max-grad-norm": plan.max_grad_norm,
        "dp-units": plan.units,
        "dp-target-epsilon": plan.target_epsilon,
        "dp-unit": plan.unit,
    }


def _prv(privacy: PrivacyState) -> float:
    try:
        return privacy.epsilon("prv")
    except Exception as err:  # PRV's numerical domain is narrower than RDP's
        log.warning("PRV accountant failed (%s); reporting RDP only", err)
        return float("nan")
