"""`fedsynth translate`: apply a CycleGAN run's translator to a slice set (e.g. CT -> MR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from fedsynth.commands.common import CommandError, console, user_errors
from fedsynth.core.grids import save_grid
from fedsynth.data.sliceset import SliceSet
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.translate import translate_slices

__all__ = ["translate"]


@user_errors
def translate(
    run_dir: Path = typer.Option(..., "--run", "-r", help="Run directory of a cyclegan run."),
    direction: str = typer.Option("a2b", "--direction", help="a2b (data.domain-a to data.domain-b) or b2a."),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Slice set (.npz from `fedsynth prepare`) to translate."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Translated slice set (.npz); a grid of inputs and their "
        "translations is written beside it as OUT-grid.png.",
    ),
    round_: str = typer.Option(
        "last", "--round", help="Round whose generator to use: a number, 'last' or 'best'."
    ),
    everything: bool = typer.Option(
        False,
        "--all",
        help="Translate every slice, not only those whose "
        "data.domain-field is the source domain (for sets without that field).",
    ),
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
    result, used, kept = translate_slices(
        run, slices, direction, round_=round_, everything=everything, path=data
    )
    left_out = int((~kept).sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    info = result.meta["translated"]
    n = min(8, len(result))
    index = np.linspace(0, len(result) - 1, n).round().astype(int)
    originals = slices.images[kept]
    grid = save_grid(
        np.concatenate([originals[index], result.images[index]]),
        grid_path,
        columns=n,
        row_names=[str(info["from"]), str(info["to"])],
        title=f"{direction}, round {used}",
        scale=max(1, 128 // result.image_size),
    )
    console.print(f"translated {len(result)} slices {info['from']} -> {info['to']} with round {used}: {out}")
    if left_out:
        console.print(f"  left out {left_out} slices of other domains (--all translates them too)")
    console.print(f"  {grid}: inputs (top) and their translations")
    console.print(
        "[yellow]the translated slices show real patients' anatomy: keep them where the input may be[/]"
    )
