"""Ingestion of image folders (de-duplicated by pixels) and the data card. Volumes: test_volumes.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.data.ingest import ingest_image_folder
from fedsynth.data.sliceset import SliceSet

from .conftest import BRAIN_MRI, require

runner = CliRunner()


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


def test_near_duplicates_are_removed_and_different_images_kept(tmp_path: Path) -> None:
    """A re-encoded, lightly altered copy (JPEG, one grey level brighter) is one image with its
    original; two different images stay two. With near_duplicate_rms=0 all three stay."""
    root = tmp_path / "near"
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 200, (8, 8)), np.ones((8, 8))).astype(np.uint8)
    _write_png(root / "a" / "original.png", smooth)
    Image.fromarray(smooth + 1).save(root / "a" / "reencoded.jpg", quality=95)
    _write_png(root / "b" / "other.png", 255 - smooth)
    slices, card = ingest_image_folder(root, size=32, holdout_fraction=0.0, seed=0)
    assert len(slices) == 2 and card.duplicates["near_duplicate_files_removed"] == 1
    assert card.duplicates["near_duplicates"][0]["kept"].endswith("original.png")
    kept, _ = ingest_image_folder(root, size=32, holdout_fraction=0.0, seed=0, near_duplicate_rms=0)
    assert len(kept) == 3


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
    # 2,870 unique after pixel de-duplication (the data README's count); 70 more are
    # re-encoded, resized, re-cropped or re-windowed copies (the copy detector's distance
    # under 0.6%), removed too
    assert dup["near_duplicate_files_removed"] == 70 and dup["near_duplicate_groups"] == 58
    assert card["images"] == 2870 - 70
    slices = SliceSet.load(out)
    assert set(slices.class_names) == {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}
    split = card["split"]
    assert split["train"]["slices"] + split["validation"]["slices"] + split["holdout"]["slices"] == 2800
    # --validation 0.1 (default): a tenth of the training images (one patient each) for checkpoint choice
    assert abs(split["validation"]["slices"] - 0.1 * (2800 - split["holdout"]["slices"])) <= 4
    # No two kept slices share decoded pixels at the source resolution, so none share them here
    # unless the resize made them collide; the exact check is on source files above.
    assert len(np.unique(slices.source)) == 2800


