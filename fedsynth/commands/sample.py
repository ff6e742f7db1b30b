"""`fedsynth sample`: synthetic slices from a run's global generator, as PNG, a slice set, NIfTI or DICOM."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsynth.commands.common import CommandError, console, user_errors
from fedsynth.models.sampling import shape_masks
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.sample import Sample, load_masks, write_sample

__all__ = ["sample"]


@user_errors
def sample(
    run_dir: Path = typer.Option(..., "--run", "-r", help="Run directory of a finished (or partial) run."),
    n: int = typer.Option(64, "--n", help="Number of synthetic slices."),
    label: str = typer.Option(
        None, help="Class to draw (a class name of the run); default: all classes in equal shares."
    ),
    round_: str = typer.Option(
        "last",
        "--round",
        help="Round whose global generator to use: a number, 'last', or 'best' (the lowest validation "
        "score).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    output_format: str = typer.Option(
        "png",
        "--format",
        help="png (one file per slice plus grid.png), npz (a slice set marked synthetic), nifti "
        "(synthetic.nii.gz, one slice per axial position) or dicom (dicom/, a Secondary Capture series "
        "whose headers say SYNTHETIC).",
    ),
    seed: int = typer.Option(0, help="Seed of the noise; the same seed gives the same images."),
    truncation: float = typer.Option(
        1.0,
        help="stylegan2-lite: pull each style towards its class's average (the truncation trick); "
        "below 1 trades diversity for typicality, e.g. 0.7. 1: off.",
    ),
    masks_path: Path = typer.Option(
        None,
        "--masks",
        help="pix2pix: draw one slice per mask in this file (a slice set from `fedsynth prepare "
        "--keep-masks`, e.g. this hospital's own, or an .npz with a 'masks' array); --n is ignored.",
    ),
    random_masks: bool = typer.Option(
        False,
        "--random-masks",
        help="pix2pix: draw --n masks from a simple shape model (ellipses of 1 to 4 label "
        "values of the run's data.mask-labels; reads no patient data), and a slice for each.",
    ),
) -> None:
    """Write synthetic slices from a run's global generator (the final round by default).

    pix2pix runs draw a slice for each mask (--masks or --random-masks) and write the
    masks with them."""
    if n < 1:
        raise CommandError("--n must be at least 1")
    if output_format not in ("png", "npz", "nifti", "dicom"):
        raise CommandError(f"--format {output_format!r}: use png, npz, nifti or dicom")
    if round_ not in ("last", "best") and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number, 'last' or 'best'")
    if not 0 < truncation <= 1:
        raise CommandError(f"--truncation {truncation}: use a value in (0, 1]")
    if (out / "manifest.json").exists():
        raise CommandError(
            f"{out} already holds a sample (manifest.json); choose another --out (nothing is overwritten)"
        )
    if masks_path is not None and random_masks:
        raise CommandError("--masks and --random-masks: give one")
    run = RunDir(run_dir)
    masks = mask_source = None
    if masks_path is not None or random_masks:
        cfg = run.load_config()
        if masks_path is not None:
            masks, mask_source = load_masks(masks_path, cfg.data.image_size)
        else:
            masks = shape_masks(n, cfg.data.image_size, cfg.data.mask_values, seed=seed)
        n = len(masks)
    if output_format == "dicom" and masks is not None:
        raise CommandError(
            "--format dicom: pix2pix samples come with masks, which fedsynth writes as png, npz or nifti "
            "(no DICOM SEG writer)"
        )
    written, provenance = write_sample(
        Sample(
            run,
            n=n,
            label=label,
            round=round_,
            seed=seed,
            truncation=truncation,
            masks=masks,
            masks_path=masks_path,
            mask_source=mask_source,
        ),
        out,
        output_format,
    )
    if masks_path is not None:
        console.print(
            f"[yellow]the masks are real patients' label maps from {masks_path} and are written unchanged "
            "beside the slices: they are not synthetic, and a slice drawn for a training patient's mask can "
            "resemble that patient's slice (see the audit's mask-conditioned fidelity); keep this output "
            "where the masks may be[/]"
        )
    console.print(
        f"wrote {written} (round {provenance['round']}{', ' + label if label else ''}); provenance in "
        f"{out / 'manifest.json'}"
    )
