"""DICOM series to RAS volumes: the real JPEG 2000 CT series, the NIfTI path's orientation rule, bad files, SEG."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from fedsynth.data.dicom import DicomSeries, find_dicom_series, load_dicom_seg, load_dicom_series
from fedsynth.data.ingest import IngestError

from .conftest import CT_VOLUMES, require

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LIVER = 5
SPLEEN = 1


# --- hand-built DICOM -------------------------------------------------------------------
def ct_slice(
    hu: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: Sequence[float] = (1.0, 1.0),
    series_uid: str,
    study_uid: str = "1.2.3.4",
    patient_id: str = "PAT-001",
    instance: int = 1,
    syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A CT image (rows, columns) = ``hu.shape``, stored as HU + 1024 with slope 1, intercept -1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = f"test {series_uid[-4:]}"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    stored = np.ascontiguousarray(np.asarray(hu) + 1024, dtype=np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = UID(syntax)  # after set_pixel_data, which refuses unknown syntaxes
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def write_stack(folder: Path, n: int = 3, *, series_uid: str | None = None, size: tuple[int, int] = (4, 5),
                step: float = 2.0, prefix: str = "s", **kwargs: object) -> list[Path]:
    """``n`` axial slices of a small CT series, ``step`` mm apart."""
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(n)
    return [
        save(ct_slice(rng.integers(-1000, 1000, size), position=(0.0, 0.0, k * step), series_uid=series_uid,
                      instance=k + 1, **kwargs), folder / f"{prefix}{k}.dcm")  # type: ignore[arg-type]
        for k in range(n)
    ]


def volume_as_dicom(volume: np.ndarray, affine_ras: np.ndarray, folder: Path, *, seed: int = 0) -> list[Path]:
    """Write a volume (indexed i, j, k; any orientation) as one DICOM slice per k, from the affine alone:
    image columns run along i, rows along j. Files get random names and reversed instance numbers."""
    lps = LPS_TO_RAS @ affine_ras
    col_size, row_size = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / col_size), *(lps[:3, 1] / row_size)]
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    paths = []
    n = volume.shape[2]
    for k in range(n):
        ds = ct_slice(volume[:, :, k].T, position=(lps @ [0, 0, k, 1])[:3], orientation=orientation,
                      spacing=(row_size, col_size), series_uid=series_uid, instance=n - k)
        paths.append(save(ds, folder / f"{rng.integers(1 << 40):x}"))
    return paths


def seg_dataset(
    frames: list[tuple[int, np.ndarray, Sequence[float]]],
    *,
    orientation: Sequence[float],
    segments: dict[int, str],
    referenced_series: str,
) -> Dataset:
    """A BINARY DICOM SEG: one frame per (segment number, mask (rows, columns), ImagePositionPatient)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SEGMENTATION_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = generate_uid()
    ds.SegmentationType = "BINARY"
    ref = Dataset()
    ref.SeriesInstanceUID = referenced_series
    ds.ReferencedSeriesSequence = [ref]
    items = []
    for number, label in segments.items():
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        items.append(item)
    ds.SegmentSequence = items
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in orientation]
    shared = Dataset()
    shared.PlaneOrientationSequence = [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for number, _, position in frames:
        pos, ident, group = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in position]
        ident.ReferencedSegmentNumber = number
        group.PlanePositionSequence = [pos]
        group.SegmentIdentificationSequence = [ident]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    masks = np.stack([m for _, m, _ in frames]).astype(np.uint8)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = masks.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.PixelData = pack_bits(masks)
    return ds


# --- the real series --------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_series() -> DicomSeries:
    root = require(CT_VOLUMES) / "example_ct_dicom"
    series, problems = find_dicom_series(root)
    assert problems == []
    assert len(series) == 1
    return series[0]


@pytest.fixture(scope="module")
def real_volume(real_series: DicomSeries) -> tuple[np.ndarray, np.ndarray]:
    return load_dicom_series(real_series)


def test_real_series_decodes_in_position_order(real_series: DicomSeries, real_volume: tuple) -> None:
    volume, affine = real_volume
    assert len(real_series.files) == 20 and real_series.modality == "CT"
    assert volume.shape == (512, 512, 20) and volume.dtype == np.float32
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    z = (affine @ np.c_[np.zeros((20, 2)), np.arange(20), np.ones(20)].T)[2]
    assert np.all(np.diff(z) > 0)
    assert np.allclose(np.diff(z), 2.0)  # the README's 2 mm slices (SliceThickness says 3)
    assert np.isclose(volume.min(), -1024) and np.percentile(volume, 5) < -950  # air
    assert 1000 < volume.max() < 3100  # bone, no wrap-around
    # Anonymised export: no PatientID, no study or series UID; the key is still a hash.
    assert not real_series.patient_known and real_series.patient_key.startswith("dcm-")


def test_real_series_matches_its_label_map(real_volume: tuple) -> None:
    volume, affine = real_volume
    seg = nib.load(require(CT_VOLUMES) / "example_seg_dicom.nii.gz")
    assert nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    seg = nib.as_closest_canonical(seg)
    labels = np.asarray(seg.dataobj)
    assert labels.shape == volume.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-3)
    assert 0 < volume[labels == LIVER].mean() < 200
    assert volume[labels == 0].mean() < -300  # mostly air and table outside the organs


def test_shuffled_file_names_give_the_same_volume(real_series: DicomSeries, real_volume: tuple,
                                                  tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for path in rng.permutation(np.array(real_series.files, dtype=object)):
        shutil.copy(path, tmp_path / f"{rng.integers(1 << 48):012x}")
    (series,), _ = find_dicom_series(tmp_path)
    volume, affine = load_dicom_series(series)
    np.testing.assert_array_equal(volume, real_volume[0])
    np.testing.assert_array_equal(affine, real_volume[1])


def test_seg_on_the_real_series_lands_on_its_label_map(real_series: DicomSeries, real_volume: tuple,
                                                       tmp_path: Path) -> None:
    """A SEG built from the LAS label map through patient coordinates reads back as that map in RAS."""
    las = nib.load(require(CT_VOLUMES) / "example_seg_dicom.nii.gz")
    las_labels = np.asarray(las.dataobj)
    to_voxel = np.linalg.inv(las.affine)
    frames = []
    for path in real_series.files[::-1]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[: ds.Rows, : ds.Columns]
        lps = ipp[:, None, None] + c * dc * iop[:3, None, None] + r * dr * iop[3:, None, None]
        ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(r, dtype=float)])
        ijk = np.rint(np.tensordot(to_voxel, ras, axes=1)[:3]).astype(int)
        pixels = las_labels[ijk[0], ijk[1], ijk[2]]
        frames += [(LIVER, pixels == LIVER, ipp), (SPLEEN, pixels == SPLEEN, ipp)]
    seg = seg_dataset(frames, orientation=iop, segments={SPLEEN: "spleen", LIVER: "liver"}, referenced_series="")
    labels, names = load_dicom_seg(save(seg, tmp_path / "seg.dcm"), real_series)
    expected = np.asarray(nib.as_closest_canonical(las).dataobj)
    assert labels.shape == real_volume[0].shape and names == {SPLEEN: "spleen", LIVER: "liver"}
    np.testing.assert_array_equal(labels == LIVER, expected == LIVER)
    np.testing.assert_array_equal(labels == SPLEEN, expected == SPLEEN)
    assert (labels == LIVER).sum() > 1000


# --- same RAS array as the NIfTI path ---------------------------------------------------
# Coronal slices stored as no NIfTI writer would pick: i runs to the patient's left (-x in RAS),
# j to inferior, k to anterior. Asymmetric shape and spacings catch any flip or swap of axes.
CORONAL_AFFINE = np.array([
    [-0.8, 0.0, 0.0, 30.0],
    [0.0, 0.0, 2.5, -40.0],
    [0.0, -0.9, 0.0, 50.0],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.fixture
def coronal(tmp_path: Path) -> tuple[np.ndarray, Path, list[Path]]:
    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 1500, size=(7, 6, 5)).astype(np.int16)
    nifti = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume, CORONAL_AFFINE), nifti)
    return volume, nifti, volume_as_dicom(volume, CORONAL_AFFINE, tmp_path / "dicom")


def test_dicom_and_nifti_of_one_volume_give_the_same_ras_array(coronal: tuple) -> None:
    _, nifti, _ = coronal
    expected = nib.as_closest_canonical(nib.load(nifti))
    (series,), problems = find_dicom_series(nifti.parent / "dicom")
    assert problems == []
    volume, affine = load_dicom_series(series)
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, np.asarray(expected.dataobj, dtype=np.float32))
    np.testing.assert_allclose(affine, expected.affine, atol=1e-4)


def test_seg_is_paired_with_its_series_and_read_onto_the_ras_grid(coronal: tuple) -> None:
    volume, nifti, files = coronal
    bright, dark = volume > 900, volume < -800
    lps = LPS_TO_RAS @ CORONAL_AFFINE
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    orientation = [*(lps[:3, 0] / 0.8), *(lps[:3, 1] / 0.9)]
    frames = [(n, mask[:, :, k].T, (lps @ [0, 0, k, 1])[:3]) for k in range(5) for n, mask in ((1, bright), (2, dark))]
    seg = seg_dataset(frames[::-1], orientation=orientation, segments={1: "bright", 2: "dark"},
                      referenced_series=series_uid)
    seg_path = save(seg, nifti.parent / "dicom" / "seg.dcm")
    (series,), problems = find_dicom_series(nifti.parent / "dicom")
    assert problems == [] and series.seg_files == [seg_path] and len(series.files) == 5
    labels, names = load_dicom_seg(seg_path, series)
    truth = nib.Nifti1Image((bright + 2 * dark).astype(np.uint16), CORONAL_AFFINE)
    expected = np.asarray(nib.as_closest_canonical(truth).dataobj)
    np.testing.assert_array_equal(labels, expected)
    assert names == {1: "bright", 2: "dark"}


# --- finding series ---------------------------------------------------------------------
def test_two_series_in_one_folder_are_found_separately(tmp_path: Path) -> None:
    first = write_stack(tmp_path, 3, prefix="a", patient_id="P1", study_uid="1.2.3.1")
    second = write_stack(tmp_path / "sub", 4, prefix="b", size=(6, 6), patient_id="P1", study_uid="1.2.3.1")
    third = write_stack(tmp_path, 2, prefix="c", patient_id="P2", study_uid="1.2.3.2")
    series, problems = find_dicom_series(tmp_path)
    assert problems == []
    found = {len(s.files): s for s in series}
    assert sorted(found) == [2, 3, 4]
    assert found[3].files == first and found[4].files == second and found[2].files == third
    assert load_dicom_series(found[4])[0].shape == (6, 6, 4)
    # One patient and study, one key; a hash, never the raw PatientID.
    assert found[3].patient_key == found[4].patient_key != found[2].patient_key
    assert all(s.patient_known and "P1" not in s.patient_key for s in series)


def test_non_dicom_files_are_skipped_by_name_and_broken_ones_reported(tmp_path: Path) -> None:
    write_stack(tmp_path, 3)
    (tmp_path / "README").write_text("scans from site A\n")
    (tmp_path / "notes.json").write_text("{}")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), tmp_path / "mask.nii.gz")
    (tmp_path / "blob").write_bytes(os.urandom(600))
    good = (tmp_path / "s0.dcm").read_bytes()
    (tmp_path / "broken.dcm").write_bytes(good[:160])
    series, problems = find_dicom_series(tmp_path)
    assert len(series) == 1 and len(series[0].files) == 3
    reported = {Path(p["file"]).name: p["reason"] for p in problems}
    assert set(reported) == {"blob", "broken.dcm"}
    assert all(reason and "\n" not in reason for reason in reported.values())


def test_missing_folder_is_an_ingest_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such folder"):
        find_dicom_series(tmp_path / "absent")


# --- broken series: IngestError naming the file -----------------------------------------
def _load_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    (series,), _ = find_dicom_series(folder)
    return load_dicom_series(series)


def test_file_without_pixel_data(tmp_path: Path) -> None:
    files = write_stack(tmp_path, 3)
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    save(ds, files[1])
    with pytest.raises(IngestError, match=re.escape(f"{files[1]}: no pixel data")):
        _load_folder(tmp_path)


def test_unknown_transfer_syntax_is_named(tmp_path: Path) -> None:
    files = write_stack(tmp_path, 2)
    made_up = "1.2.826.0.1.3680043.99.1"
    save(ct_slice(np.zeros((4, 5)), position=(0, 0, 4.0), series_uid=pydicom.dcmread(files[0]).SeriesInstanceUID,
                  syntax=made_up), tmp_path / "odd.dcm")
    with pytest.raises(IngestError, match=re.escape(f"{tmp_path / 'odd.dcm'}: unsupported transfer syntax {made_up}")):
        _load_folder(tmp_path)


def test_syntax_without_an_installed_decoder_is_named(tmp_path: Path) -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    from pydicom.encaps import encapsulate

    path = write_stack(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(20)])
    ds["PixelData"].VR = "OB"
    save(ds, path)
    with pytest.raises(IngestError) as err:
        _load_folder(tmp_path)
    assert str(err.value).startswith(f"{path}: cannot decode transfer syntax {JPEGLSLossless}")
    assert "JPEG-LS Lossless" in str(err.value) and "\n" not in str(err.value)


def _same_position(files: list[Path]) -> Path:
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    return save(ds, files[2])


def _other_size(files: list[Path]) -> Path:
    old = pydicom.dcmread(files[1])
    ds = ct_slice(np.zeros((3, 5)), position=old.ImagePositionPatient, series_uid=old.SeriesInstanceUID)
    return save(ds, files[1])


def _tilted(files: list[Path]) -> Path:
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    return save(ds, files[1])


def _gap(files: list[Path]) -> Path:
    ds = pydicom.dcmread(files[4])
    ds.ImagePositionPatient = [0.0, 0.0, 12.0]  # 0, 2, 4, 6, 12: slices missing before the last
    return save(ds, files[4])


def _multi_frame(files: list[Path]) -> Path:
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return save(ds, files[0])


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (_same_position, "duplicate slice"),
        (_other_size, "3x5 pixels, but"),
        (_tilted, "ImageOrientationPatient differs"),
        (_gap, "beyond the 1% tolerance"),
        (_multi_frame, "multi-frame image .2 frames. is not supported"),
    ],
)
def test_broken_series_are_refused_naming_the_file(tmp_path: Path, breaker: Callable[[list[Path]], Path],
                                                   reason: str) -> None:
    files = write_stack(tmp_path, 5)
    broken = breaker(files)
    with pytest.raises(IngestError, match=reason) as err:
        _load_folder(tmp_path)
    message = str(err.value)
    assert broken.name in message and "\n" not in message
