"""Ingestion: image folders (de-duplicated by pixels), NIfTI volumes with masks, and the data card."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.shared.ingest import IngestError, ingest_image_folder, ingest_nifti_folder
from fedsynth.shared.phantoms import DEFAULT_HOSPITALS, LESION, LIVER, write_phantom_hospitals
from fedsynth.shared.sliceset import SliceSet

from .conftest import BRAIN_MRI, require

runner = CliRunner()
# The demo's hospitals with fewer patients each, to keep the tests quick.
SMALL_HOSPITALS = tuple(replace(p, patients=5) for p in DEFAULT_HOSPITALS)


def _write_png(path: Path, pixels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Training/Testing x two classes, with a byte copy across splits, a re-encoded copy
    (same pixels, different bytes) and a corrupt file."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("Training", "Testing"):
        for cls in ("glioma", "none"):
            for i in range(6):
                _write_png(root / split / cls / f"{i}.png", rng.integers(0, 255, (40, 30), dtype=np.uint8))
    (root / "Testing/glioma/copy.png").write_bytes((root / "Training/glioma/0.png").read_bytes())
    gray = np.asarray(Image.open(root / "Training/none/1.png"))
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / "Testing/none/rgb-copy.png")
    (root / "Training/none/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_image_folder_dedups_by_pixels_and_names_unreadable_files(image_folder: Path) -> None:
    slices, card = ingest_image_folder(image_folder, size=32, holdout_fraction=0.25, seed=0)
    assert card.files_found == 27 and card.files_read == 26
    assert card.unreadable[0]["file"].endswith("broken.jpg")
    dup = card.duplicates
    assert (dup["byte_identical_groups"], dup["byte_identical_groups_crossing_split"]) == (1, 1)
    assert (dup["pixel_identical_groups"], dup["pixel_identical_groups_crossing_split"]) == (2, 2)
    assert dup["files_removed"] == 2
    assert len(slices) == 24 and slices.images.shape[1:] == (32, 32)
    assert slices.class_names == ("glioma", "none")
    assert slices.privacy_unit == "slice"
    assert card.split["holdout"]["slices"] == 6


def test_prepare_cli_writes_slice_set_and_card(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    result = runner.invoke(app, ["prepare", str(image_folder), "--out", str(out), "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output
    card = json.loads((tmp_path / "s.card.json").read_text())
    assert card["images"] == len(SliceSet.load(out)) == 24


def test_prepare_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code != 0
    assert "nowhere" in result.output and "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["prepare", str(empty), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_brain_mri_folder_matches_the_documented_duplicate_counts(tmp_path: Path) -> None:
    root = require(BRAIN_MRI)
    out = tmp_path / "mri.npz"
    result = runner.invoke(app, ["prepare", str(root), "--out", str(out), "--size", "32", "--format", "json"])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "mri.card.json").read_text())
    dup = card["duplicates"]
    assert (dup["byte_identical_groups"], dup["byte_identical_groups_crossing_split"]) == (166, 64)
    assert (dup["pixel_identical_groups"], dup["pixel_identical_groups_crossing_split"]) == (300, 213)
    assert card["images"] == 2870
    slices = SliceSet.load(out)
    assert set(slices.class_names) == {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}
    assert card["split"]["train"]["slices"] + card["split"]["holdout"]["slices"] == 2870
    # No two kept slices share decoded pixels at the source resolution, so none share them here
    # unless the resize made them collide; the exact check is on source files above.
    assert len(np.unique(slices.source)) == 2870


def test_phantom_nifti_volumes_become_labelled_slices_per_site(tmp_path: Path) -> None:
    write_phantom_hospitals(tmp_path / "ph", hospitals=SMALL_HOSPITALS, seed=0, size=64, slices=8)
    slices, card = ingest_nifti_folder(
        tmp_path / "ph", size=32, window="ct-abdomen", label_from_mask=[LESION], label_names=["no_lesion", "lesion"],
        min_voxels=1, keep_slices_with=[LIVER], holdout_fraction=0.2, seed=0,
    )
    assert card.files_read == 15
    assert set(card.sites) == {p.name for p in DEFAULT_HOSPITALS}
    assert slices.privacy_unit == "patient" and slices.class_names == ("no_lesion", "lesion")
    assert 0 < slices.labels.mean() < 1
    # Labels follow the masks: re-derive every slice's label from its segmentation file.
    masks: dict[str, np.ndarray] = {}
    for source, label in zip(slices.source, slices.labels, strict=True):
        volume_name, z = str(source).rsplit("#z=", 1)
        if volume_name not in masks:
            seg_path = tmp_path / "ph" / volume_name.replace("volume-", "segmentation-")
            masks[volume_name] = np.asarray(nib.as_closest_canonical(nib.load(seg_path)).dataobj)
        assert int((masks[volume_name][:, :, int(z)] == LESION).any()) == label, source


def test_a_mask_that_does_not_fit_its_volume_is_named_and_skipped(tmp_path: Path) -> None:
    write_phantom_hospitals(tmp_path / "ph", hospitals=SMALL_HOSPITALS, seed=0, size=32, slices=4)
    seg = sorted((tmp_path / "ph/hospital-a").glob("segmentation-*.nii.gz"))[0]
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), seg)
    corrupt = sorted((tmp_path / "ph/hospital-b").glob("volume-*.nii.gz"))[0]
    corrupt.write_bytes(b"not gzip")
    slices, card = ingest_nifti_folder(tmp_path / "ph", size=32, keep_slices_with=[LIVER], seed=0)
    named = {Path(u["file"]).name for u in card.unreadable}
    assert seg.name in named or seg.name.replace("segmentation", "volume") in named
    assert corrupt.name in named
    assert card.files_read == card.files_found - 2
    assert len(slices) > 0


def test_nifti_folder_without_volumes_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(IngestError):
        ingest_nifti_folder(tmp_path, size=32)
