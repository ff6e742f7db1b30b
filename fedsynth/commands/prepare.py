"""`fedsynth prepare`: raw scans (an image folder, NIfTI volumes or DICOM series) to a slice set and a
data card."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedsynth.commands.common import CommandError, console, echo_json, user_errors
from fedsynth.data.ingest import (
    NEAR_DUPLICATE_RMS,
    DataCard,
    detect_source_kind,
    ingest_image_folder,
    summarize_unreadable,
)
from fedsynth.data.sliceset import with_validation
from fedsynth.data.volumes import ingest_volumes, parse_mask_classes

__all__ = ["prepare", "card_path_for"]


def card_path_for(out: Path) -> Path:
    """``mri.npz`` -> ``mri.card.json``."""
    return out.with_name(out.name.removesuffix(".npz") + ".card.json")


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"{option} {text!r}: expected label values such as 2 or 1,2") from None


def _parse_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        volume, sep, mask = item.partition("=")
        if not sep or not volume.strip() or not mask.strip():
            raise CommandError(f"--pair {item!r}: expected VOLUME=MASK, e.g. ct.nii.gz=ct-labels.nii.gz")
        pairs[volume.strip()] = mask.strip()
    return pairs


@user_errors
def prepare(
    source: Path = typer.Argument(
        ...,
        help="An image folder (<split>/<class>/*.jpg|png or <class>/*), or a folder of NIfTI volumes and/or "
        "DICOM series with masks (pairing rules below).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Slice set to write (.npz); the data card goes beside it as .card.json."
    ),
    size: int = typer.Option(
        64,
        help="Output side in pixels (32, 64, 128 or 256 for the built-in models; 256 is practical on a GPU).",
    ),
    holdout: float = typer.Option(0.2, help="Share of patients held out for audits, stratified by class."),
    keep_masks: bool = typer.Option(
        False,
        "--keep-masks",
        help="Volumes: store each slice's label map beside it (nearest-neighbour resized), "
        "for mask-to-image models; volumes without a mask are skipped, named.",
    ),
    validation: float = typer.Option(
        0.1,
        help="Share of the training patients kept out of training, stratified by class, to choose a "
        "checkpoint (`fedsynth sample --round best`) without touching the holdout; 0: none.",
    ),
    seed: int = typer.Option(0, help="Seed of the train/validation/holdout draw."),
    keep_folder_split: bool = typer.Option(
        False,
        help="Image folders: use the folder's own split (Testing/test/holdout/val become holdout) instead of "
        "drawing one.",
    ),
    near_duplicates: float = typer.Option(
        NEAR_DUPLICATE_RMS,
        "--near-duplicates",
        help="Image folders: images closer than this RMS share of the intensity range, once a mirror, "
        "rotation, zoom, shift or intensity curve is undone, are one image (re-encoded, resized, re-cropped "
        "or re-windowed copies); 0 keeps them.",
    ),
    window: str = typer.Option(
        "ct-abdomen",
        help="Volumes: intensity window, a preset (ct-abdomen W400/L40, ct-lung W1500/L-600, ct-brain "
        "W80/L40, mri = per-volume 0.5-99.5 percentiles) or WIDTH,LEVEL in HU.",
    ),
    label_from_mask: str = typer.Option(
        "",
        help="Volumes: label slices from the mask. 5 or 2,3: one class, present when >= --min-voxels voxels "
        "carry the value(s); liver=5,kidney=2+3: named classes, first match wins.",
    ),
    label_names: str = typer.Option(
        "",
        help="Volumes: absent,present names for a single class (default absent,present); with named classes, "
        "one name for slices with none (default none).",
    ),
    min_voxels: int = typer.Option(1, help="Volumes: voxels of a label needed to give a slice its class."),
    keep_slices_with: str = typer.Option(
        "", help="Volumes: keep only slices whose mask contains these value(s), e.g. 5 for the liver."
    ),
    masks: Path = typer.Option(
        None,
        "--masks",
        help="Volumes: a folder of masks named like their volumes (case.nii.gz for case.nii.gz or "
        "case_0000.nii.gz; <folder>.nii.gz for a DICOM series in <folder>/).",
    ),
    pair: list[str] = typer.Option(
        [],
        "--pair",
        help="Volumes: VOLUME=MASK, paths relative to SOURCE, for names no rule pairs, e.g. --pair "
        "example_ct_sm.nii.gz=example_seg.nii.gz or --pair series_folder=labels.nii.gz (repeatable).",
    ),
    output_format: str = typer.Option(
        "text", "--format", help="text (a table) or json (the card on stdout)."
    ),
) -> None:
    """Turn raw scans into a slice set (.npz) with a patient-level train/holdout split.

    Prints a data card: files read, unreadable files (named, with the reason, and
    skipped), duplicates removed, images per class and train/holdout counts; the card
    is also written as JSON. Exits non-zero only when nothing usable was found.

    Volumes (NIfTI, DICOM series grouped by SeriesInstanceUID and ordered by position)
    are reoriented to RAS, cut into axial slices, windowed and resized. Masks pair by
    name: --pair first, then files in --masks, then segmentation-XXX for volume-XXX (LiTS)
    or XXX_seg / XXX_mask / XXX_label / XXX_labels / XXX_segmentation for XXX (for a DICOM
    series, names built from its folder), then labelsTr/case for imagesTr/case_0000
    (nnU-Net), then a DICOM SEG that references the series. NIfTI files with seg, mask or
    label in their name are masks, never images.
    """
    if size < 8:
        raise CommandError(f"--size {size}: too small (use 32, 64, 128 or 256)")
    if out.suffix != ".npz":
        raise CommandError(f"--out {out}: the slice set file must end in .npz")
    kind = detect_source_kind(source)
    names = [n.strip() for n in label_names.split(",") if n.strip()]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=output_format == "json",
    ) as progress:
        task = progress.add_task(f"reading {source}", total=None)

        def report(done: int, total: int, stage: str = "") -> None:
            progress.update(task, completed=done, total=total)

        if kind == "image-folder":
            if keep_masks:
                raise CommandError(
                    f"--keep-masks: {source} is an image folder, which has no masks (volumes only)"
                )
            slices, card = ingest_image_folder(
                source,
                size=size,
                holdout_fraction=holdout,
                keep_folder_split=keep_folder_split,
                seed=seed,
                near_duplicate_rms=near_duplicates,
                progress=report,
            )
        else:
            slices, card = ingest_volumes(
                source,
                size=size,
                window=window,
                classes=parse_mask_classes(label_from_mask, names, min_voxels),
                keep_slices_with=_parse_ints(keep_slices_with, "--keep-slices-with"),
                masks_dir=masks,
                pairs=_parse_pairs(pair),
                holdout_fraction=holdout,
                seed=seed,
                progress=report,
                keep_masks=keep_masks,
            )
    if not 0 <= validation < 1:
        raise CommandError(f"--validation {validation}: use a share in [0, 1)")
    if validation > 0:
        slices = with_validation(slices, validation, seed=seed)
        card.fill_from(slices)
        card.split_rule += (
            f"; then {validation:.0%} of the training patients kept for validation (checkpoint choice)"
        )
    slices.save(out)
    card.output = str(out)
    card_path = card.write(card_path_for(out))
    if output_format == "json":
        echo_json(card.to_dict())
        return
    print_card(card, card_path)


def print_card(card: DataCard, card_path: Path) -> None:
    """The data card as a short table for the terminal."""
    table = Table(title=f"data card: {card.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", f"{card.source} ({card.kind})")
    table.add_row("files read", f"{card.files_read} of {card.files_found}")
    table.add_row(
        "skipped", f"{len(card.unreadable)} (unreadable or unusable, named below)" if card.unreadable else "0"
    )
    dup = card.duplicates
    if dup:
        table.add_row(
            "duplicates",
            f"{dup['byte_identical_groups']} byte-identical groups "
            f"({dup['byte_identical_groups_crossing_split']} crossing the folder split); "
            f"{dup['pixel_identical_groups']} pixel-identical groups "
            f"({dup['pixel_identical_groups_crossing_split']} crossing); {dup['files_removed']} files "
            "removed",
        )
        if "near_duplicate_groups" in dup:
            table.add_row(
                "near-duplicates",
                f"{dup['near_duplicate_groups']} groups ({dup['near_duplicate_groups_crossing_split']} "
                f"crossing the folder split); {dup['near_duplicate_files_removed']} more files removed "
                f"({dup['near_duplicate_rule']})",
            )
    table.add_row("images", f"{card.images} at {card.image_size}x{card.image_size}")
    table.add_row("per class", ", ".join(f"{k} {v}" for k, v in card.images_per_class.items()))
    for name, counts in card.split.items():
        table.add_row(
            name,
            f"{counts['slices']} slices, {counts['patients']} "
            f"patient{'s' if counts['patients'] != 1 else ''}",
        )
    table.add_row("split rule", card.split_rule)
    table.add_row("privacy unit", card.privacy_unit + ("" if card.patient_ids_known else " (no patient ids)"))
    if card.sites:
        table.add_row("sites", ", ".join(f"{k} {v}" for k, v in card.sites.items()))
    console.print(table)
    for line in summarize_unreadable(card):
        console.print(f"  [yellow]skipped[/] {line}", highlight=False)
    for note in card.notes:
        console.print(f"  [dim]note: {note}[/]")
    console.print(f"card written to {card_path}")
