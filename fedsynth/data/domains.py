"""CycleGAN's two domains: which slices of a slice set are domain A and which are B."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedsynth.data.sliceset import SliceSet, SliceSetError

if TYPE_CHECKING:
    from fedsynth.runs.config import DataConfig

__all__ = ["domain_values", "domains_of", "guess_domains"]


def domain_values(slices: SliceSet, field: str) -> np.ndarray:
    """Each slice's value of ``data.domain-field`` (``site`` or ``class``), as strings.

    Raises
    ------
    SliceSetError
        The slice set has no such field (``site`` is absent when the volumes did not sit
        in per-site sub-folders).
    """
    if field == "class":
        return np.asarray(slices.class_names, dtype=str)[slices.labels]
    if slices.site is None:
        raise SliceSetError(
            "slice set has no site field for data.domain-field=site: prepare volumes in one sub-folder per "
            "domain (e.g. ct/ and mr/), or set data.domain-field=class"
        )
    return slices.site.astype(str)


def domains_of(slices: SliceSet, data: DataConfig, *, path: object = "slice set") -> np.ndarray:
    """``"a"``, ``"b"`` or ``""`` (neither) for each slice, from ``data.domain-field``,
    ``data.domain-a`` and ``data.domain-b``.

    Raises
    ------
    SliceSetError
        Domains not named, the field is missing, or no slice belongs to either domain.
    """
    if not data.domain_a or not data.domain_b or data.domain_a == data.domain_b:
        raise SliceSetError(
            f"{path}: cyclegan needs two different domains: set data.domain-a and data.domain-b (values of "
            f"the slice set's {data.domain_field} field)"
        )
    try:
        values = domain_values(slices, data.domain_field)
    except SliceSetError as err:
        raise SliceSetError(f"{path}: {err}") from None
    out = np.where(values == data.domain_a, "a", np.where(values == data.domain_b, "b", ""))
    if not (out != "").any():
        found = ", ".join(sorted(set(values.tolist()))[:8])
        raise SliceSetError(
            f"{path}: no slice whose {data.domain_field} is {data.domain_a!r} or {data.domain_b!r} (found: "
            f"{found})"
        )
    return out


def guess_domains(slices: SliceSet, field: str) -> tuple[str, str] | None:
    """The two values of ``field`` in sorted order when it has exactly two, else None."""
    try:
        values = sorted(set(domain_values(slices, field).tolist()))
    except SliceSetError:
        return None
    return (values[0], values[1]) if len(values) == 2 else None
