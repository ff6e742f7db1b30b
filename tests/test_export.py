"""Synthetic slices to NIfTI and DICOM: pixels come back exactly, and every header says synthetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from fedsynth.data.dicom import find_dicom_series, load_dicom_series
from fedsynth.synthesis.export import stack_affine, write_dicom_series, write_nifti_stack
from fedsynth.data.ingest import axial_display

GENERATOR = {"run": "runs/demo", "round": 3, "checkpoint": "sha256:0f1e2d"}
SPACING = (0.7, 0.9, 2.5)


@pytest.fixture
def images() -> np.ndarray:
    """Five non-square slices whose corners differ, so any flip or transpose shows."""
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(5, 24, 32), dtype=np.uint8)
    stack[:, 0, 0] = 255
    stack[:, -1, -1] = 0
    return stack


def test_nifti_stack_reads_back_the_same_slices(images: np.ndarray, tmp_path: Path) -> None:
    path = write_nifti_stack(images, tmp_path / "out" / "synthetic.nii.gz", spacing=SPACING,
                             description="demo run, class liver")
    image = nib.as_closest_canonical(nib.load(path))
    volume = np.asarray(image.dataobj)
    assert volume.dtype == np.uint8 and volume.shape == (32, 24, 5)
    for k, expected in enumerate(images):
        np.testing.assert_array_equal(axial_display(volume[:, :, k]), expected)
    assert bytes(image.header["descrip"]).startswith(b"SYNTHETIC demo run")
    np.testing.assert_allclose(image.header.get_zooms(), SPACING, rtol=1e-6)


def test_dicom_series_reads_back_with_pydicom_and_the_loader(images: np.ndarray, tmp_path: Path) -> None:
    labels = ["liver", "liver", "no liver", "liver", "no liver"]
    paths = write_dicom_series(images, tmp_path / "dicom", labels=labels, description="demo run",
                               generator_info=GENERATOR, spacing=SPACING)
    assert len(paths) == 5
    sop_uids = set()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
        np.testing.assert_array_equal(ds.pixel_array, images[k])
        comment = json.loads(ds.ImageComments)
        assert comment == {"synthetic": True, "label": labels[k], "generator": GENERATOR}
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 5
    # Renamed and shuffled, the series still loads in slice order, on the NIfTI stack's grid.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, path in enumerate(reversed(paths)):
        shutil.copy(path, shuffled / f"img{i}")
    (series,), problems = find_dicom_series(shuffled)
    assert problems == [] and series.description.startswith("SYNTHETIC")
    volume, affine = load_dicom_series(series)
    for k, expected in enumerate(images):
        np.testing.assert_array_equal(axial_display(volume[:, :, k]), expected)
    np.testing.assert_allclose(affine, stack_affine((32, 24, 5), SPACING), atol=1e-6)


def test_dicom_headers_say_synthetic_and_carry_no_identity(images: np.ndarray, tmp_path: Path) -> None:
    first = write_dicom_series(images[:2], tmp_path / "a", labels=["x", "y"], description="demo",
                               generator_info=GENERATOR)
    second = write_dicom_series(images[:2], tmp_path / "b", labels=["x", "y"], description="SYNTHETIC demo",
                                generator_info=GENERATOR)
    a, b = (pydicom.dcmread(p[0]) for p in (first, second))
    for ds in (a, b):
        assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in ds.ImageType
        assert ds.SeriesDescription == "SYNTHETIC demo"
        assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
        assert ds.PatientID == "SYNTHETIC" and str(ds.PatientName) == "SYNTHETIC^NONE"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert ds.StudyInstanceUID.is_valid and ds.SeriesInstanceUID.is_valid
    assert a.StudyInstanceUID != b.StudyInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert {pydicom.dcmread(p).StudyInstanceUID for p in first} == {a.StudyInstanceUID}


def test_bad_input_is_refused(images: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_nifti_stack(images.astype(np.float32), tmp_path / "x.nii.gz", description="x")
    with pytest.raises(ValueError, match="one per slice"):
        write_dicom_series(images, tmp_path / "d", labels=["a"], description="x", generator_info={})
    with pytest.raises(ValueError, match="JSON"):
        write_dicom_series(images[:1], tmp_path / "d", labels=["a"], description="x", generator_info={"f": object()})
    write_dicom_series(images[:1], tmp_path / "d", labels=["a"], description="x", generator_info={})
    with pytest.raises(FileExistsError, match="synthetic-0001.dcm"):
        write_dicom_series(images[:1], tmp_path / "d", labels=["a"], description="x", generator_info={})
