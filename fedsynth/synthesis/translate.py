"""Real slices moved to the other domain by a translating run's generator (cyclegan), kept
with their patients, splits and masks, and marked with where they came from."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.errors import UserError
from fedsynth.data.domains import domain_values
from fedsynth.data.sliceset import SliceSet, SliceSetError
from fedsynth.models import DOMAIN
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.generator import load_generator

__all__ = ["translate_slices"]


def translate_slices(
    run: RunDir,
    slices: SliceSet,
    direction: str,
    *,
    round_: int | str | None = "last",
    everything: bool = False,
    path: object = "slice set",
) -> tuple[SliceSet, int, np.ndarray]:
    """The slices of the direction's source domain (all of them with ``everything``),
    translated by the run's generator.

    The result keeps each slice's patient, split, source file and mask (translation keeps
    the anatomy in place), and its domain field (site, or class where the run's domains
    are classes and the target is one of the set's classes) names the target domain.

    Returns (translated slices, round used, which input slices they are: a boolean mask).

    Raises
    ------
    UserError
        Not a translating run, another image size, or no slice of the source domain.
    """
    cfg = run.load_config()
    family = cfg.model.family
    if family.condition != DOMAIN:
        raise UserError(
            f"{run.root}: model {cfg.model.name!r} does not translate (only cyclegan does); `fedsynth "
            "sample` draws its slices"
        )
    if direction not in ("a2b", "b2a"):
        raise UserError(f"--direction {direction!r}: use a2b or b2a")
    if slices.image_size != cfg.data.image_size:
        raise UserError(
            f"{path}: slices are {slices.image_size} px but the run translates {cfg.data.image_size} px "
            f"(prepare them with --size {cfg.data.image_size})"
        )
    source, target = (
        (cfg.data.domain_a, cfg.data.domain_b)
        if direction == "a2b"
        else (cfg.data.domain_b, cfg.data.domain_a)
    )
    keep = np.ones(len(slices), dtype=bool)
    if not everything:
        try:
            values = domain_values(slices, cfg.data.domain_field)
        except SliceSetError as err:
            raise UserError(f"{path}: {err}; or give --all to translate every slice as {source!r}") from None
        keep = values == source
        if not keep.any():
            found = ", ".join(sorted(set(values.tolist()))[:8])
            raise UserError(
                f"{path}: no slice whose {cfg.data.domain_field} is {source!r}, the source domain of "
                f"{direction} (found: {found}); give --all to translate every slice as {source!r}"
            )
        slices = slices.subset(keep)
    loaded = load_generator(run, round_)
    used = loaded.round
    images = family.translate(loaded.gen, slices.images, direction)
    site, labels, class_names = slices.site, slices.labels, slices.class_names
    if cfg.data.domain_field == "site":
        site = np.full(len(slices), target)
    elif target in class_names:
        labels = np.full(len(slices), class_names.index(target), dtype=labels.dtype)
    meta = {
        **slices.meta,
        "translated": {
            "direction": direction,
            "from": source,
            "to": target,
            "field": cfg.data.domain_field,
            "run": str(run.root),
            "round": used,
            "checkpoint_sha256": file_sha256(run.checkpoint(used)),
            "input": str(path),
        },
        "derived_from_real": True,
    }
    return replace(slices, images=images, labels=labels, site=site, meta=meta), used, keep
