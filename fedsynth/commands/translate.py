"""`fedsynth translate`: apply a CycleGAN run's translator to a slice set (e.g. CT -> MR)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import typer

from ..shared.checkpoint import file_sha256, load_checkpoint
from ..shared.domains import domain_values
from ..shared.models import build_gan
from ..shared.rundir import RunDir
from ..shared.sampling import save_grid, translate as run_translator
from ..shared.sliceset import SliceSet, SliceSetError
from ..shared.weights import load_weights, split_model
from .common import CommandError, console, user_errors

__all__ = ["translate", "translate_slices"]


def translate_slices(run: RunDir, slices: SliceSet, direction: str, *, round_: int | str | None = "last",
                     everything: bool = False, path: object = "slice set") -> tuple[SliceSet, int, np.ndarray]:
    """The slices of the direction's source domain (all of them with ``everything``),
    translated by the run's generator.

    The result keeps each slice's patient, split, source file and mask (translation keeps
    the anatomy in place), and its domain field (site, or class where the run's domains
    are classes and the target is one of the set's classes) names the target domain.

    Returns (translated slices, round used, which input slices they are: a boolean mask).

    Raises
    ------
    CommandError
        Not a cyclegan run, another image size, or no slice of the source domain.
    """
    cfg = run.load_config()
    if not cfg.model.on_domains:
        raise CommandError(f"{run.root}: model {cfg.model.name!r} does not translate (only cyclegan does); "
                           "`fedsynth sample` draws its slices")
    if direction not in ("a2b", "b2a"):
        raise CommandError(f"--direction {direction!r}: use a2b or b2a")
    if slices.image_size != cfg.data.image_size:
        raise CommandError(f"{path}: slices are {slices.image_size} px but the run translates "
                           f"{cfg.data.image_size} px (prepare them with --size {cfg.data.image_size})")
    source, target = (cfg.data.domain_a, cfg.data.domain_b) if direction == "a2b" else (cfg.data.domain_b,
                                                                                         cfg.data.domain_a)
    keep = np.ones(len(slices), dtype=bool)
    if not everything:
        try:
            values = domain_values(slices, cfg.data.domain_field)
        except SliceSetError as err:
            raise CommandError(f"{path}: {err}; or give --all to translate every slice as {source!r}") from None
        keep = values == source
        if not keep.any():
            found = ", ".join(sorted(set(values.tolist()))[:8])
            raise CommandError(f"{path}: no slice whose {cfg.data.domain_field} is {source!r}, the source domain of "
                               f"{direction} (found: {found}); give --all to translate every slice as {source!r}")
        slices = slices.subset(keep)
    used = run.resolve_round(round_)
    gen, _ = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=max(1, len(cfg.data.classes)))
    tensors, _ = load_checkpoint(run.checkpoint(used))
    load_weights(gen, split_model(tensors)[0])
    images = run_translator(gen, slices.images, direction)
    site, labels, class_names = slices.site, slices.labels, slices.class_names
    if cfg.data.domain_field == "site":
        site = np.full(len(slices), target)
    elif target in class_names:
        labels = np.full(len(slices), class_names.index(target), dtype=labels.dtype)
    meta = {**slices.meta, "translated": {
        "direction": direction, "from": source, "to": target, "field": cfg.data.domain_field,
        "run": str(run.root), "round": used, "checkpoint_sha256": file_sha256(run.checkpoint(used)),
        "input": str(path),
    }, "derived_from_real": True}
    return replace(slices, images=images, labels=labels, site=site, meta=meta), used, keep


@user_errors
def translate(
    run_dir: Path = typer.Option(..., "--run", "-r", help="Run directory of a cyclegan run."),
    direction: str = typer.Option("a2b", "--direction", help="a2b (data.domain-a to data.domain-b) or b2a."),
    data: Path = typer.Option(..., "--data", "-d", help="Slice set (.npz from `fedsynth prepare`) to translate."),
    out: Path = typer.Option(..., "--out", "-o", help="Translated slice set (.npz); a grid of inputs and their "
                             "translations is written beside it as OUT-grid.png."),
    round_: str = typer.Option("last", "--round", help="Round whose generator to use: a number, 'last' or 'best'."),
    everything: bool = typer.Option(False, "--all", help="Translate every slice, not only those whose "
                                    "data.domain-field is the source domain (for sets without that field)."),
) -> None:
    """Translate slices between a cyclegan run's two domains, e.g. CT to MR.

    Only the slices of the source domain are translated (the others are left out and
    counted), unless --all. The output is a slice set with the same patients, splits,
    sources and masks, marked with the direction, run, round and checkpoint hash; its
    slices show real patients' anatomy, so keep it where the input may be.
    """
    grid_path = out.with_name(out.stem + "-grid.png")
    for path in (out, grid_path):
        if path.exists():
            raise CommandError(f"{path} already exists; choose another --out (nothing is overwritten)")
    if out.suffix != ".npz":
        raise CommandError(f"--out {out}: a slice set file ending in .npz")
    run = RunDir(run_dir)
    slices = SliceSet.load(data)
    result, used, kept = translate_slices(run, slices, direction, round_=round_, everything=everything, path=data)
    left_out = int((~kept).sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    info = result.meta["translated"]
    n = min(8, len(result))
    index = np.linspace(0, len(result) - 1, n).round().astype(int)
    originals = slices.images[kept]
    grid = save_grid(np.concatenate([originals[index], result.images[index]]), grid_path,
                     columns=n, row_names=[str(info["from"]), str(info["to"])],
                     title=f"{direction}, round {used}", scale=max(1, 128 // result.image_size))
    console.print(f"translated {len(result)} slices {info['from']} -> {info['to']} with round {used}: {out}")
    if left_out:
        console.print(f"  left out {left_out} slices of other domains (--all translates them too)")
    console.print(f"  {grid}: inputs (top) and their translations")
    console.print("[yellow]the translated slices show real patients' anatomy: keep them where the input may be[/]")
