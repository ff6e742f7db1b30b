"""DP-SGD's parts that know nothing of GANs: accounting, a hospital's ledger, per-sample
clipping and Poisson sampling of patients. The only package that imports Opacus, and only
when DP is used: ``PerSampleClipper`` (a subclass of an Opacus module) loads on first use."""

from typing import TYPE_CHECKING, Any

from fedsynth.privacy.accounting import (
    PrivacyError,
    PrivacyPlan,
    default_delta,
    epsilon_for,
    plan_privacy,
)
from fedsynth.privacy.ledger import (
    PrivacyState,
    plan_for_run,
    privacy_report,
    sigma_for_remaining,
)
from fedsynth.privacy.sampling import PatientSampler, secure_generator

if TYPE_CHECKING:
    from fedsynth.privacy.clipping import PerSampleClipper, check_private_layers

__all__ = [
    "PatientSampler",
    "PerSampleClipper",
    "PrivacyError",
    "PrivacyPlan",
    "PrivacyState",
    "check_private_layers",
    "default_delta",
    "epsilon_for",
    "plan_for_run",
    "plan_privacy",
    "privacy_report",
    "secure_generator",
    "sigma_for_remaining",
]


def __getattr__(name: str) -> Any:
    if name in ("PerSampleClipper", "check_private_layers"):
        from fedsynth.privacy import clipping

        return getattr(clipping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
