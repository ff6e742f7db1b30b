"""Synthetic slices to clinical formats (NIfTI, DICOM), each file saying plainly that it is synthetic."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SYNTHETIC",
    "stack_affine",
    "write_dicom_series",
    "write_nifti_stack",
]

log = logging.getLogger(__name__)

SYNTHETIC = "SYNTHETIC"
NIFTI_DESCRIP_BYTES = 80
DICOM_LO_CHARS = 64
DICOM_LT_CHARS = 10240


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or 0 in images.shape:
        raise ValueError(
            f"images must be a non-empty uint8 array [n, h, w], got {images.dtype} {images.shape}"
        )
    return images


def _synthetic_text(description: str, limit: int) -> str:
    text = description.strip()
    if not text.upper().startswith(SYNTHETIC):
        text = f"{SYNTHETIC} {text}".strip()
    return text[:limit]


def _ds(value: float) -> Any:
    """A decimal string (DS) value that fits DICOM's 16 characters."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def stack_affine(shape: tuple[int, int, int], spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-RAS affine of a synthetic stack: axis-aligned RAS, centred on the origin.

    Parameters
    ----------
    shape : (x, y, z) voxels: image width, image height, number of slices.
    spacing : (x, y, z) voxel size in mm: pixel width, pixel height, slice distance.

    Raises
    ------
    ValueError
        A spacing that is not three positive numbers.
    """
    sizes = np.asarray(spacing, dtype=np.float64)
    if sizes.shape != (3,) or not np.all(sizes > 0):
        raise ValueError(f"spacing must be three positive numbers (x, y, z) in mm, got {spacing!r}")
    affine = np.diag([*sizes, 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2 * sizes
    return affine


def write_nifti_stack(
    images: np.ndarray,
    path: str | Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    description: str,
) -> Path:
    """Write synthetic slices as one NIfTI volume, slice ``k`` at axial position ``k``.

    The slices are taken as radiological display images (anterior at the top, the
    patient's right on the image's left), the inverse of ``ingest.axial_display``:
    ``axial_display(nib.as_closest_canonical(nib.load(path)).get_fdata()[:, :, k])``
    gives ``images[k]`` back. The affine is RAS, centred on the origin. The header's
    ``descrip`` starts with "SYNTHETIC".

    Parameters
    ----------
    images : uint8 [n, h, w].
    path : ``.nii`` or ``.nii.gz`` file to write (its folder is created).
    spacing : (x, y, z) voxel size in mm: pixel width, pixel height, slice distance.
    description : what the images are (run, class); truncated to fit the 80-byte field.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ValueError
        ``images`` not uint8 [n, h, w], a bad spacing, or a path not ending in .nii/.nii.gz.
    """
    import nibabel as nib

    images = _check_images(images)
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    # axial_display(v) = v.T[::-1, ::-1], so v = display[::-1, ::-1].T; stacked: (x, y, z).
    volume = np.ascontiguousarray(images[:, ::-1, ::-1].transpose(2, 1, 0))
    image = nib.Nifti1Image(volume, stack_affine(volume.shape, spacing))
    image.header.set_xyzt_units("mm")
    descrip = _synthetic_text(description, NIFTI_DESCRIP_BYTES).encode("ascii", "replace")[
        :NIFTI_DESCRIP_BYTES
    ]
    image.header["descrip"] = descrip
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    log.info("wrote %d synthetic slices to %s", len(images), path)
    return path


def write_dicom_series(
    images: np.ndarray,
    out_dir: str | Path,
    *,
    labels: Sequence[str],
    description: str,
    generator_info: dict[str, Any],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[Path]:
    """Write synthetic slices as a DICOM Secondary Capture series, one file per slice.

    Explicit VR little endian, 8-bit MONOCHROME2. The headers say the images are
    synthetic: ImageType DERIVED/SECONDARY/SYNTHETIC, ConversionType ``SYN`` (synthetic
    image), SeriesDescription starting with "SYNTHETIC", PatientName ``SYNTHETIC^NONE``,
    PatientID ``SYNTHETIC``, BurnedInAnnotation and RecognizableVisualFeatures ``NO``,
    and ImageComments holding JSON with the slice's class label and ``generator_info``.
    Study, series, frame of reference and instance UIDs are new. The image plane
    attributes place the slices on the same RAS grid as :func:`write_nifti_stack`
    (axial, slice ``k`` at position ``k``), so ``load_dicom_series`` reads back the same
    volume and ``axial_display`` the same pixels.

    Parameters
    ----------
    images : uint8 [n, h, w], radiological display orientation.
    out_dir : folder for ``synthetic-0001.dcm`` ... (created if needed).
    labels : class label of each slice (n of them).
    description : what the images are; becomes the SeriesDescription (64 characters at most).
    generator_info : JSON-serialisable facts about the generator (run, round, checkpoint hash).
    spacing : (x, y, z) voxel size in mm: pixel width, pixel height, slice distance.

    Returns
    -------
    list[Path]
        The files written, in slice order.

    Raises
    ------
    ValueError
        ``images`` not uint8 [n, h, w], ``labels`` not one per slice, a bad spacing, or
        ``generator_info`` not JSON-serialisable or too long for ImageComments.
    FileExistsError
        A file of that name already exists in ``out_dir`` (nothing is overwritten).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    from fedsynth import __version__

    images = _check_images(images)
    n, height, width = images.shape
    if len(labels) != n:
        raise ValueError(f"labels: one per slice needed, got {len(labels)} for {n} slices")
    comments = []
    for label in labels:
        try:
            text = json.dumps(
                {"synthetic": True, "label": str(label), "generator": generator_info}, sort_keys=True
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"generator_info is not JSON-serialisable: {err}") from err
        if len(text) > DICOM_LT_CHARS:
            raise ValueError(f"ImageComments would be {len(text)} characters, over DICOM's {DICOM_LT_CHARS}")
        comments.append(text)
    out_dir = Path(out_dir)
    paths = [out_dir / f"synthetic-{k + 1:04d}.dcm" for k in range(n)]
    clashes = [p for p in paths if p.exists()]
    if clashes:
        raise FileExistsError(f"{clashes[0]}: already exists; write each synthetic series to a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    # The NIfTI stack's RAS grid, in DICOM terms: display row r, column c of slice k is RAS
    # voxel (w-1-c, h-1-r, k); image rows run to the patient's left (+x LPS), columns to
    # posterior (+y LPS), so the first pixel sits at RAS voxel (w-1, h-1, k).
    ras = stack_affine((width, height, n), spacing)
    now = dt.datetime.now(dt.UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    series_description = _synthetic_text(description, DICOM_LO_CHARS)
    for k, path in enumerate(paths):
        corner_ras = ras @ np.array([width - 1, height - 1, k, 1.0])
        corner_lps = [-corner_ras[0], -corner_ras[1], corner_ras[2]]
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: labels and descriptions may not be ASCII
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", SYNTHETIC]
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "OT"
        ds.ConversionType = "SYN"  # DICOM's defined term for "synthetic image"
        ds.Manufacturer = "fedsynth"
        ds.SoftwareVersions = __version__
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = f"{SYNTHETIC} images generated by fedsynth"
        ds.SeriesDescription = series_description
        ds.PatientName = "SYNTHETIC^NONE"
        ds.PatientID = SYNTHETIC
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "SYNTHETIC: generated images, no real patient"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ["L", "P"]
        ds.ImagePositionPatient = [_ds(v) for v in corner_lps]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row distance, column distance
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.ImageComments = comments[k]
        ds.BurnedInAnnotation = "NO"
        ds.RecognizableVisualFeatures = "NO"
        ds.LossyImageCompression = "00"
        ds.set_pixel_data(np.ascontiguousarray(images[k]), "MONOCHROME2", 8, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True, overwrite=False)
    log.info("wrote %d synthetic DICOM slices to %s (series %s)", n, out_dir, series_uid)
    return paths
