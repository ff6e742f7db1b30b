"""Clinical volumes to slice sets: NIfTI (real CT/MR and files the tests write), pairing,
orientation, labels from masks, and every kind of bad input named and skipped."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.data.ingest import IngestError, axial_display, resize_square, window_intensities
from fedsynth.data.phantoms import DEFAULT_HOSPITALS, LESION, LIVER, write_phantom_hospitals
from fedsynth.data.sliceset import SliceSet
from fedsynth.data.volumes import MaskClasses, ingest_volumes, parse_mask_classes

from .conftest import CT_VOLUMES, SMALL_HOSPITALS, require

runner = CliRunner()
LIVER_TS = 5  # TotalSegmentator's "total" map: 5 = liver


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def _asymmetric(shape: tuple[int, int, int] = (20, 16, 6)) -> np.ndarray:
    """HU-like volume in RAS index order with a bright marker at the patient's right,
    anterior, superior corner (high x, high y, high z) and a dimmer one left-posterior."""
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[2:-2, 2:-2, :] = 40.0
    vol[-5:-2, -5:-2, -2:] = 400.0  # right, anterior, superior
    vol[2:4, 2:4, :2] = 150.0  # left, posterior, inferior
    return vol


# --- real CT / MR ---------------------------------------------------------------------------
def test_real_ct_gives_one_slice_per_axial_position_labelled_from_its_mask(tmp_path: Path) -> None:
    ct = require(CT_VOLUMES)
    _link(ct / "example_ct_sm.nii.gz", tmp_path / "in" / "ct.nii.gz")
    _link(ct / "example_seg.nii.gz", tmp_path / "in" / "ct_seg.nii.gz")
    # Independently: the label map itself, in its own (RAS) index order.
    seg = np.asarray(nib.load(ct / "example_seg.nii.gz").dataobj)
    counts = [(seg[:, :, z] == LIVER_TS).sum() for z in range(seg.shape[2])]
    n = int(np.median(counts))  # about half the slices have this much liver
    expected = [int(c >= n) for c in counts]
    slices, card = ingest_volumes(tmp_path / "in", size=64, window="ct-abdomen",
                                  classes=parse_mask_classes("5", ["small_liver", "liver"], min_voxels=n))
    assert len(slices) == 30 and card.files_read == 1 and not card.unreadable
    assert [s.rsplit("#z=", 1)[1] for s in slices.source] == [str(z) for z in range(30)]
    assert slices.labels.tolist() == expected and 0 < sum(expected) < 30
    assert slices.class_names == ("small_liver", "liver")
    # Pixels: the volume windowed W400/L40 and shown radiologically.
    vol = np.asarray(nib.load(ct / "example_ct_sm.nii.gz").dataobj, dtype=np.float32)
    z = 15
    want = resize_square(axial_display(window_intensities(vol, (400, 40))[:, :, z]), 64)
    assert np.array_equal(slices.images[z], want)


def test_keep_masks_stores_each_slices_label_map_aligned_with_it(tmp_path: Path) -> None:
    """`prepare --keep-masks` on the real CT: every slice's label map, in the same display
    orientation, resized by nearest neighbour (only the mask's own labels appear), kept
    through save, load and subsets; a volume without a mask is named and skipped."""
    ct = require(CT_VOLUMES)
    _link(ct / "example_ct_sm.nii.gz", tmp_path / "in" / "ct.nii.gz")
    _link(ct / "example_seg.nii.gz", tmp_path / "in" / "ct_seg.nii.gz")
    _link(ct / "example_ct_sm.nii.gz", tmp_path / "in" / "other" / "unpaired.nii.gz")
    out = tmp_path / "ct.npz"
    result = runner.invoke(app, ["prepare", str(tmp_path / "in"), "--out", str(out), "--size", "64",
                                 "--label-from-mask", "5", "--min-voxels", "50", "--keep-masks"])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "ct.card.json").read_text())
    assert [Path(u["file"]).name for u in card["unreadable"]] == ["unpaired.nii.gz"]
    assert "--keep-masks" in card["unreadable"][0]["reason"]
    slices = SliceSet.load(out)
    seg = np.asarray(nib.load(ct / "example_seg.nii.gz").dataobj)
    assert slices.masks is not None and slices.masks.shape == (30, 64, 64)
    assert set(np.unique(slices.masks)) <= set(np.unique(seg).astype(int)), "no label invented by resizing"
    z = 15
    assert np.array_equal(slices.masks[z], resize_square(axial_display(seg[:, :, z]).astype(np.uint8), 64,
                                                         nearest=True))
    # Aligned with the image: the liver (5) in the mask is where the windowed CT shows soft tissue.
    liver = slices.masks[z] == 5
    assert liver.sum() > 20 and slices.images[z][liver].mean() > slices.images[z][slices.masks[z] == 0].mean()
    assert np.array_equal(slices.only("train").masks, slices.masks[slices.split == "train"])


def test_named_mask_classes_and_keep_slices_with(tmp_path: Path) -> None:
    ct = require(CT_VOLUMES)
    _link(ct / "example_ct_sm.nii.gz", tmp_path / "in" / "volume-7.nii.gz")
    _link(ct / "example_seg.nii.gz", tmp_path / "in" / "segmentation-7.nii.gz")
    classes = parse_mask_classes("gallbladder=4,stomach=6+7", ["other"], min_voxels=100)
    slices, _ = ingest_volumes(tmp_path / "in", size=32, classes=classes, keep_slices_with=[2, 3])  # kidneys
    seg = np.asarray(nib.load(ct / "example_seg.nii.gz").dataobj)
    kept = [z for z in range(seg.shape[2]) if np.isin(seg[:, :, z], [2, 3]).any()]
    assert len(slices) == len(kept) < 30
    wants = []
    for z in kept:
        part = seg[:, :, z]
        wants.append(1 if (part == 4).sum() >= 100 else 2 if np.isin(part, [6, 7]).sum() >= 100 else 0)
    assert slices.labels.tolist() == wants and len(set(wants)) >= 2
    assert slices.class_names == ("other", "gallbladder", "stomach")


def test_lps_mr_and_ras_ct_come_out_in_the_same_orientation(tmp_path: Path) -> None:
    """The liver is on the patient's right: in radiological display, the image's left.
    Ingest the label maps themselves as images (window 2,5 makes label 5 bright)."""
    ct = require(CT_VOLUMES)
    for name, src in (("ct", "example_seg.nii.gz"), ("mr", "example_seg_mr.nii.gz")):
        assert nib.aff2axcodes(nib.load(ct / src).affine) == (("R", "A", "S") if name == "ct" else ("L", "P", "S"))
        _link(ct / src, tmp_path / name / f"{name}.nii.gz")
        slices, _ = ingest_volumes(tmp_path / name, size=64, window="2,5")
        liver = np.stack([img == 127 for img in slices.images])  # 5 -> mid-grey; others 0 or 255
        cols = np.nonzero(liver.any(axis=(0, 1)))[0]
        assert liver.sum() > 100 and cols.mean() < 32, f"{name}: liver not on the image's left"


def test_asymmetric_volume_stored_ras_or_lps_gives_the_same_slices(tmp_path: Path) -> None:
    vol = _asymmetric()
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol, ras), _mk(tmp_path / "ras") / "a.nii.gz")
    # The same voxels stored left-posterior first: flip x and y, negate their axes.
    lps = ras.copy()
    lps[0, 0], lps[1, 1] = -2.0, -2.0
    lps[:3, 3] = ras[:3, :3] @ [vol.shape[0] - 1, vol.shape[1] - 1, 0]
    nib.save(nib.Nifti1Image(vol[::-1, ::-1, :].copy(), lps), _mk(tmp_path / "lps") / "a.nii.gz")
    a, _ = ingest_volumes(tmp_path / "ras", size=20, window="2000,0")
    b, _ = ingest_volumes(tmp_path / "lps", size=20, window="2000,0")
    assert np.array_equal(a.images, b.images)
    top = a.images[-1]  # the most superior slice
    bright = np.argwhere(top == top.max())
    # Anterior at the top of the image, the patient's right on the image's left.
    assert bright[:, 0].mean() < 10 and bright[:, 1].mean() < 10


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- phantoms (no shared data needed) ---------------------------------------------------------
def test_phantom_volumes_become_labelled_slices_per_site(tmp_path: Path) -> None:
    write_phantom_hospitals(tmp_path / "ph", hospitals=SMALL_HOSPITALS, seed=0, size=64, slices=8)
    slices, card = ingest_volumes(
        tmp_path / "ph", size=32, window="ct-abdomen", classes=MaskClasses("no_lesion", (("lesion", (LESION,)),)),
        keep_slices_with=[LIVER], holdout_fraction=0.2, seed=0,
    )
    assert card.files_read == 15
    assert set(card.sites) == {p.name for p in DEFAULT_HOSPITALS}
    assert slices.privacy_unit == "patient" and slices.class_names == ("no_lesion", "lesion")
    assert 0 < slices.labels.mean() < 1
    # Holdout and train never share a patient.
    train, holdout = set(slices.only("train").patient_ids), set(slices.only("holdout").patient_ids)
    assert train and holdout and not train & holdout
    masks: dict[str, np.ndarray] = {}
    for source, label in zip(slices.source, slices.labels, strict=True):
        volume_name, z = str(source).rsplit("#z=", 1)
        if volume_name not in masks:
            seg_path = tmp_path / "ph" / volume_name.replace("volume-", "segmentation-")
            masks[volume_name] = np.asarray(nib.as_closest_canonical(nib.load(seg_path)).dataobj)
        assert int((masks[volume_name][:, :, int(z)] == LESION).any()) == label, source


def test_masks_folder_pairs_by_name(tmp_path: Path) -> None:
    vol = _asymmetric()
    mask = (vol > 300).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(vol, np.eye(4)), _mk(tmp_path / "images") / "case1_0000.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), _mk(tmp_path / "labels") / "case1.nii.gz")
    slices, card = ingest_volumes(tmp_path / "images", size=16, classes=parse_mask_classes("3"),
                                  masks_dir=tmp_path / "labels")
    assert card.files_read == 1
    assert slices.labels.tolist() == [int(mask[:, :, z].any()) for z in range(vol.shape[2])]


# --- bad input: named, skipped, counted ----------------------------------------------------------
def _bad_folder(root: Path) -> dict[str, str]:
    """A folder with one good volume and one of each broken kind; returns {file: expected words}."""
    good = _asymmetric()
    nib.save(nib.Nifti1Image(good, np.eye(4)), _mk(root) / "good.nii.gz")
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), np.eye(4)), root / "good_seg.nii.gz")
    raw = gzip.compress(nib.Nifti1Image(good, np.eye(4)).to_bytes())
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), np.eye(4)), root / "truncated_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), root / "fourd.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), root / "fourd_seg.nii.gz")
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), root / "nans.nii.gz")
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), np.eye(4)), root / "nans_seg.nii.gz")
    nib.save(nib.Nifti1Image(good, np.eye(4)), root / "shape.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), root / "shape_seg.nii.gz")
    nib.save(nib.Nifti1Image(good, np.eye(4)), root / "grid.nii.gz")
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), np.diag([2.0, 1, 1, 1])), root / "grid_seg.nii.gz")
    nib.save(nib.Nifti1Image(good, np.eye(4)), root / "nomask.nii.gz")
    nib.save(nib.Nifti1Image((good > 0).astype(np.uint8), np.eye(4)), root / "orphan_seg.nii.gz")
    return {"truncated.nii.gz": "truncated gzip", "fourd.nii.gz": "3D", "nans.nii.gz": "NaN", "shape.nii.gz": "shape",
            "grid.nii.gz": "grid", "nomask.nii.gz": "mask", "orphan_seg.nii.gz": "pairs with no volume"}


def test_every_broken_volume_is_named_with_its_reason_and_the_rest_is_kept(tmp_path: Path) -> None:
    expected = _bad_folder(tmp_path / "in")
    slices, card = ingest_volumes(tmp_path / "in", size=16, classes=parse_mask_classes("1"))
    reasons = {Path(u["file"]).name: u["reason"] for u in card.unreadable}
    assert set(reasons) == set(expected), reasons
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert card.files_read == 1 and len(slices) == 6
    assert all(s.startswith("good.nii.gz#") for s in slices.source)


def test_prepare_cli_reports_broken_files_and_fails_only_when_nothing_is_usable(tmp_path: Path) -> None:
    _bad_folder(tmp_path / "in")
    result = runner.invoke(app, ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "v.npz"), "--size", "16",
                                 "--label-from-mask", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "truncated gzip" in result.output.replace("\n", " ")
    card = json.loads((tmp_path / "v.card.json").read_text())
    assert {Path(u["file"]).name for u in card["unreadable"]} >= {"truncated.nii.gz", "orphan_seg.nii.gz"}
    assert len(SliceSet.load(tmp_path / "v.npz")) == 6
    (tmp_path / "in" / "good.nii.gz").unlink()
    result = runner.invoke(app, ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "w.npz"), "--size", "16",
                                 "--label-from-mask", "1"], terminal_width=200)
    assert result.exit_code != 0 and "no usable slices" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w.npz").exists()


def test_empty_folder_and_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    _mk(tmp_path / "empty")
    result = runner.invoke(app, ["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code != 0 and "empty" in result.output and "Traceback" not in result.output
    with pytest.raises(IngestError, match="label-from-mask"):
        parse_mask_classes("liver")
    with pytest.raises(IngestError, match="label-names"):
        parse_mask_classes("5", ["a", "b", "c"])
    with pytest.raises(IngestError, match="masks"):
        ingest_volumes(tmp_path / "empty", size=16, masks_dir=tmp_path / "missing")


def test_nifti_read_speed_is_recorded_in_the_card(tmp_path: Path) -> None:
    write_phantom_hospitals(tmp_path / "ph", hospitals=SMALL_HOSPITALS[:1], seed=0, size=32, slices=4)
    _, card = ingest_volumes(tmp_path / "ph", size=16)
    assert any("slices/s" in note for note in card.notes)


# --- DICOM through the same path -------------------------------------------------------------------
def test_real_dicom_series_with_its_label_map_matches_slice_for_slice(tmp_path: Path) -> None:
    ct = require(CT_VOLUMES)
    shutil.copytree(ct / "example_ct_dicom", tmp_path / "in" / "ct-series")
    _link(ct / "example_seg_dicom.nii.gz", tmp_path / "labels" / "ct-series.nii.gz")
    seg = np.asarray(nib.as_closest_canonical(nib.load(ct / "example_seg_dicom.nii.gz")).dataobj)
    counts = [(seg[:, :, z] == LIVER_TS).sum() for z in range(seg.shape[2])]
    n = int(np.median([c for c in counts if c])) if any(counts) else 1
    slices, card = ingest_volumes(tmp_path / "in", size=64, masks_dir=tmp_path / "labels",
                                  classes=parse_mask_classes("5", ["other", "liver"], min_voxels=n))
    assert card.kind == "dicom" and card.files_read == 1 and len(slices) == 20
    assert slices.labels.tolist() == [int(c >= n) for c in counts] and 0 < slices.labels.sum() < 20


def test_dicom_and_nifti_of_one_volume_give_the_same_slices(tmp_path: Path) -> None:
    from .test_dicom import volume_as_dicom

    vol = np.round(_asymmetric((24, 18, 5)))
    affine = np.array([[0, 0, 2.5, -10], [-0.8, 0, 0, 40], [0, 0.8, 0, -5], [0, 0, 0, 1]])  # stored coronal
    nib.save(nib.Nifti1Image(vol, affine), _mk(tmp_path / "nifti") / "a.nii.gz")
    volume_as_dicom(vol, affine, _mk(tmp_path / "dicom" / "a"))
    a, _ = ingest_volumes(tmp_path / "nifti", size=24, window="ct-abdomen")
    b, card = ingest_volumes(tmp_path / "dicom", size=24, window="ct-abdomen")
    assert card.kind == "dicom" and len(a) == len(b) > 0
    assert np.array_equal(a.images, b.images)


def test_broken_dicom_is_named_and_the_other_series_are_kept(tmp_path: Path) -> None:
    import pydicom

    from .test_dicom import save, write_stack

    write_stack(tmp_path / "in" / "good", 4, size=(8, 8))
    nopix = write_stack(tmp_path / "in" / "nopix", 3, size=(8, 8))
    ds = pydicom.dcmread(nopix[1])
    del ds.PixelData
    save(ds, nopix[1])
    odd = write_stack(tmp_path / "in" / "odd", 2, size=(8, 8))
    ds = pydicom.dcmread(odd[0])
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99.1"
    save(ds, odd[0])
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    slices, card = ingest_volumes(tmp_path / "in", size=8, window="ct-abdomen")
    assert card.files_found == 3 and card.files_read == 1 and len(slices) == 4
    reasons = " | ".join(f"{u['file']}: {u['reason']}" for u in card.unreadable)
    assert str(nopix[1]) in reasons and "no pixel data" in reasons
    assert str(odd[0]) in reasons and "transfer syntax" in reasons


def test_nnunet_layout_channels_are_one_patient_and_label_folders_are_masks(tmp_path: Path) -> None:
    vol = _asymmetric()
    mask = (vol > 300).astype(np.uint8)
    for case in ("case_001", "case_002"):
        for channel in ("0000", "0001"):
            nib.save(nib.Nifti1Image(vol, np.eye(4)), _mk(tmp_path / "ds" / "imagesTr") / f"{case}_{channel}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), _mk(tmp_path / "ds" / "labelsTr") / f"{case}.nii.gz")
    slices, card = ingest_volumes(tmp_path / "ds", size=16, classes=parse_mask_classes("1"), holdout_fraction=0.5)
    assert card.files_read == 4 and not card.unreadable  # label maps were not taken as scans
    assert sorted(set(slices.patient_ids)) == ["imagesTr/case_001", "imagesTr/case_002"]
    assert slices.labels.tolist() == [int(mask[:, :, z].any()) for z in range(vol.shape[2])] * 4
    # Both channels of a case are on the same side of the split.
    for patient in set(slices.patient_ids):
        assert len(set(slices.split[slices.patient_ids == patient])) == 1
