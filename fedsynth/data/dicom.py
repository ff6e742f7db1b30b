"""DICOM CT/MR series (and DICOM SEG label maps) to RAS volumes, the same as the NIfTI path gives."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "DicomSeries",
    "find_dicom_series",
    "load_dicom_seg",
    "load_dicom_series",
]

log = logging.getLogger(__name__)

# Files skipped without a word: their names say they are not DICOM. Anything else is read,
# and what cannot be read as a DICOM image is reported, never silently dropped.
NOT_DICOM_SUFFIXES = frozenset(
    {
        ".txt",
        ".md",
        ".rst",
        ".json",
        ".csv",
        ".tsv",
        ".xml",
        ".html",
        ".htm",
        ".pdf",
        ".yaml",
        ".yml",
        ".log",
        ".ini",
        ".cfg",
        ".py",
        ".sh",
        ".nii",
        ".gz",
        ".zip",
        ".tar",
        ".npz",
        ".npy",
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".tif",
        ".tiff",
        ".gif",
        ".nrrd",
        ".mha",
        ".mhd",
    }
)
NOT_DICOM_NAMES = frozenset({"readme", "license", "licence", "dicomdir", "thumbs.db"})
SEG_MODALITY = "SEG"
# Slices closer than this along the normal (mm) are the same slice.
DUPLICATE_TOLERANCE_MM = 1e-3
# LPS (DICOM patient coordinates) to RAS (NIfTI world coordinates).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _fail(message: str) -> NoReturn:
    # Imported here, not at the top: ingest.py may import this module, and a top-level
    # import each way would be a cycle.
    from fedsynth.data.ingest import IngestError

    raise IngestError(message)


def _one_line(err: BaseException) -> str:
    return str(err).strip().split("\n")[0] or type(err).__name__


@dataclass
class DicomSeries:
    """The image files of one DICOM series, found by :func:`find_dicom_series`.

    Attributes
    ----------
    uid : SeriesInstanceUID, or ``unnamed-<hash>`` when the files carry none (anonymised
        exports); the hash covers the folder, study, frame of reference, series number,
        modality and description, so files of one unnamed series stay together.
    files : the image files, in path order (slices are ordered by position when loaded).
    modality : e.g. ``CT`` or ``MR``.
    description : SeriesDescription (may be empty).
    patient_key : a hash of PatientID (else of StudyInstanceUID), usable as a privacy unit id;
        the raw PatientID is never kept. When both are empty it is a hash of ``uid`` and
        ``patient_known`` is False (each such series is then its own unit).
    patient_known : whether ``patient_key`` came from PatientID / StudyInstanceUID.
    rows, columns : image size of the first file.
    seg_files : DICOM SEG files whose ReferencedSeriesSequence names this series; read
        them with :func:`load_dicom_seg`.
    """

    uid: str
    files: list[Path]
    modality: str
    description: str
    patient_key: str
    patient_known: bool
    rows: int
    columns: int
    seg_files: list[Path] = field(default_factory=list)


def _obviously_not_dicom(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith("."):
        return True
    stem = name.split(".")[0]
    return path.suffix.lower() in NOT_DICOM_SUFFIXES or name in NOT_DICOM_NAMES or stem in NOT_DICOM_NAMES


def _has_dicm_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _hash(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()


def _series_key(path: Path, ds: Dataset) -> tuple[str, bool]:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid, True
    parts = [str(path.parent)] + [
        str(ds.get(k, "") or "")
        for k in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "Modality", "SeriesDescription")
    ]
    return f"unnamed-{_hash(*parts)}", False


def find_dicom_series(root: Path) -> tuple[list[DicomSeries], list[dict[str, str]]]:
    """Walk a folder for DICOM image series, reading headers only.

    Image files are grouped by SeriesInstanceUID. Files whose names say they are not
    DICOM (``README``, ``*.json``, ``*.nii.gz``, hidden files, ``DICOMDIR``, ...) are
    skipped silently; every other file that cannot be read as a DICOM image is reported
    in the problems list. DICOM SEG objects are not series of their own: each is attached
    to the series its ReferencedSeriesSequence names (``DicomSeries.seg_files``), or
    reported when that series is not in the folder.

    Parameters
    ----------
    root : the folder, searched recursively.

    Returns
    -------
    series : one :class:`DicomSeries` per series, sorted by folder, description and uid.
    problems : ``{"file": path, "reason": one line}`` for each file that looks like DICOM
        but is broken or is not an image (e.g. a structured report).

    Raises
    ------
    IngestError
        ``root`` is not a folder.
    """
    import pydicom

    root = Path(root)
    if not root.is_dir():
        _fail(f"{root}: no such folder")
    problems: list[dict[str, str]] = []
    members: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    named: dict[str, bool] = {}
    segs: list[tuple[Path, Any]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if _obviously_not_dicom(path):
            log.debug("%s: not DICOM by its name, skipped", path)
            continue
        try:
            magic = _has_dicm_magic(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is named and skipped
            problems.append({"file": str(path), "reason": f"not readable as DICOM: {_one_line(err)}"})
            continue
        modality = str(ds.get("Modality", "") or "")
        identified = any(k in ds for k in ("SOPClassUID", "Modality", "Rows"))
        if not magic and not identified:
            problems.append(
                {"file": str(path), "reason": "not DICOM (no DICM preamble, no DICOM attributes)"}
            )
        elif not identified:
            problems.append(
                {"file": str(path), "reason": "DICOM preamble but no readable dataset (truncated?)"}
            )
        elif modality == SEG_MODALITY:
            segs.append((path, ds))
        elif "Rows" not in ds or "Columns" not in ds:
            kind = getattr(ds.get("SOPClassUID", None), "name", "") or modality or "unknown"
            problems.append({"file": str(path), "reason": f"DICOM object without an image ({kind}), skipped"})
        else:
            key, has_uid = _series_key(path, ds)
            members[key].append((path, ds))
            named[key] = has_uid
    series: list[DicomSeries] = []
    for uid, entries in members.items():
        first = entries[0][1]
        if not named[uid]:
            log.warning("%s: no SeriesInstanceUID; grouped as %s", entries[0][0].parent, uid)
        patient = str(first.get("PatientID", "") or "").strip()
        study = str(first.get("StudyInstanceUID", "") or "").strip()
        known = bool(patient or study)
        series.append(
            DicomSeries(
                uid=uid,
                files=[p for p, _ in entries],
                modality=str(first.get("Modality", "") or ""),
                description=str(first.get("SeriesDescription", "") or ""),
                # One patient is one privacy unit across studies: key on PatientID when
                # there is one (follow-up studies of a patient stay together), else on
                # the study.
                patient_key="dcm-"
                + (_hash(patient) if patient else _hash("study", study) if study else _hash(uid)),
                patient_known=known,
                rows=int(first.Rows),
                columns=int(first.Columns),
            )
        )
    by_uid = {s.uid: s for s in series}
    for path, ds in segs:
        refs = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])]
        target = next((by_uid[r] for r in refs if r in by_uid), None)
        if target is None:
            reason = f"SEG references series {refs or '(none)'}, not in this folder"
            problems.append({"file": str(path), "reason": reason})
        else:
            target.seg_files.append(path)
    series.sort(key=lambda s: (str(s.files[0].parent), s.description, s.uid))
    for problem in problems:
        log.warning("%s: %s", problem["file"], problem["reason"])
    return series, problems


# --- geometry ---------------------------------------------------------------------------
@dataclass
class _Geometry:
    """A series' slices in position order and its voxel-to-LPS affine (array indexed column, row, slice)."""

    files: list[Path]
    datasets: list[Any]
    rows: int
    columns: int
    orientation: np.ndarray  # 6 direction cosines: row direction, then column direction
    normal: np.ndarray
    positions: np.ndarray  # projections of ImagePositionPatient on the normal, ascending
    lps_affine: np.ndarray


def _floats(path: Path, ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword, None)
    if value is None or len(value) != count:
        _fail(f"{path}: no valid {keyword} (needed to place the slice in space)")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        _fail(f"{path}: {keyword} {list(value)} is not numeric")


def _geometry(files: Sequence[Path], datasets: Sequence[Any], *, spacing_tolerance: float) -> _Geometry:
    """Check a series is one regular stack of slices; order it by position on the slice normal."""
    path0, ds0 = files[0], datasets[0]
    rows, columns = int(ds0.get("Rows", 0) or 0), int(ds0.get("Columns", 0) or 0)
    iop0 = _floats(path0, ds0, "ImageOrientationPatient", 6)
    spacing0 = _floats(path0, ds0, "PixelSpacing", 2)
    row_dir, col_dir = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        _fail(f"{path0}: ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    normal = np.cross(row_dir, col_dir)
    ipps = []
    for path, ds in zip(files, datasets, strict=True):
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if size != (rows, columns):
            _fail(
                f"{path}: {size[0]}x{size[1]} pixels, but {path0.name} in the same series has "
                f"{rows}x{columns}"
            )
        if not np.allclose(_floats(path, ds, "ImageOrientationPatient", 6), iop0, atol=1e-4):
            _fail(f"{path}: ImageOrientationPatient differs from {path0.name} in the same series")
        if not np.allclose(_floats(path, ds, "PixelSpacing", 2), spacing0, rtol=1e-4):
            _fail(f"{path}: PixelSpacing differs from {path0.name} in the same series")
        ipps.append(_floats(path, ds, "ImagePositionPatient", 3))
    projections = np.array([p @ normal for p in ipps])
    order = np.argsort(projections, kind="stable")
    files = [files[i] for i in order]
    datasets = [datasets[i] for i in order]
    ipp = np.array([ipps[i] for i in order])
    positions = projections[order]
    steps = np.diff(positions)
    for k, step in enumerate(steps):
        if step < DUPLICATE_TOLERANCE_MM:
            _fail(
                f"{files[k + 1]}: same slice position ({positions[k]:.3f} mm along the normal) as "
                f"{files[k].name}: duplicate slice"
            )
    n = len(files)
    if n > 1:
        median = float(np.median(steps))
        for k, step in enumerate(steps):
            if abs(step - median) > spacing_tolerance * median:
                _fail(
                    f"{files[k + 1]}: {step:.3f} mm from the previous slice, but the series' spacing is "
                    f"{median:.3f} mm (beyond the {spacing_tolerance:.0%} tolerance: missing or extra "
                    "slices?)"
                )
        step_vector = (ipp[-1] - ipp[0]) / (n - 1)
        drift = np.linalg.norm(ipp - (ipp[0] + np.arange(n)[:, None] * step_vector), axis=1)
        worst = int(np.argmax(drift))
        if drift[worst] > spacing_tolerance * median:
            _fail(
                f"{files[worst]}: ImagePositionPatient lies {drift[worst]:.3f} mm off the line of the other "
                "slices"
            )
    else:
        thickness = ds0.get("SpacingBetweenSlices", None) or ds0.get("SliceThickness", None) or 1.0
        step_vector = normal * float(thickness)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing0[1]  # along a row: next column, PixelSpacing[1] apart
    lps[:3, 1] = col_dir * spacing0[0]  # down a column: next row, PixelSpacing[0] apart
    lps[:3, 2] = step_vector
    lps[:3, 3] = ipp[0]
    return _Geometry(files, datasets, rows, columns, iop0, normal, positions, lps)


def _reorient_to_ras(native: np.ndarray, lps_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array (column, row, slice) with its LPS affine, through nibabel's closest canonical:
    the same rule that reorients NIfTI volumes on ingestion."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.Nifti1Image(native, LPS_TO_RAS @ lps_affine))
    return np.ascontiguousarray(np.asarray(image.dataobj)), np.asarray(image.affine, dtype=np.float64)


def _decode_slice(path: Path, ds: Dataset) -> np.ndarray:
    """Pixels of one single-frame image in stored units after the modality rescale."""
    from pydicom.pixels import apply_rescale, get_decoder
    from pydicom.uid import UID

    if "PixelData" not in ds:
        kind = "FloatPixelData" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else "PixelData"
        reason = "float pixel data is not supported" if kind != "PixelData" else "no pixel data"
        _fail(f"{path}: {reason}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        _fail(f"{path}: multi-frame image ({frames} frames) is not supported; convert to single-frame files")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        _fail(f"{path}: {ds.get('PhotometricInterpretation', 'colour')} image; only grayscale is supported")
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not syntax:
        _fail(f"{path}: no TransferSyntaxUID in the file meta; cannot tell how the pixels are encoded")
    label = f"transfer syntax {syntax} ({syntax.name if syntax.name != str(syntax) else 'unknown'})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        _fail(f"{path}: unsupported {label}: no pixel data decoder exists for it")
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        _fail(f"{path}: cannot decode {label}: needs one of {missing}")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - any decoder failure is named, with the file and the syntax
        _fail(f"{path}: {label} failed to decode: {_one_line(err)}")
    return np.asarray(apply_rescale(pixels, ds), dtype=np.float32)


def load_dicom_series(
    series: DicomSeries | Sequence[Path], *, spacing_tolerance: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a DICOM series into a RAS volume, as the NIfTI path sees a NIfTI of it.

    Slices are ordered by the projection of ImagePositionPatient on the slice normal (the
    cross product of the ImageOrientationPatient rows), never by InstanceNumber or file
    name. The LPS affine built from orientation, positions and spacings is turned into
    RAS and handed to ``nibabel.as_closest_canonical``, so the result equals
    ``nib.as_closest_canonical(nib.load(nifti_of_this_series))``: an array indexed
    (x, y, z) and its 4x4 affine. A gantry tilt stays in the affine as a shear.
    Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg for JPEG
    2000). MONOCHROME1 images are not inverted: values are physical units, not display.

    Parameters
    ----------
    series : a :class:`DicomSeries`, or the list of its files.
    spacing_tolerance : largest allowed deviation of a slice gap from the median gap, as
        a fraction of it.

    Returns
    -------
    volume : float32, in HU for CT (stored values after RescaleSlope / RescaleIntercept).
    affine : 4x4 voxel-to-RAS affine (mm).

    Raises
    ------
    IngestError
        Naming the file, with one line: unreadable file; no pixel data; an unsupported or
        undecodable transfer syntax (with its UID and name); a multi-frame or colour
        image; rows/columns, orientation or pixel spacing that differ within the series;
        missing geometry; duplicate slice positions; slice gaps beyond the tolerance.
    """
    import pydicom

    files = list(series.files if isinstance(series, DicomSeries) else series)
    if not files:
        _fail("empty DICOM series: no files")
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path, force=True))
        except Exception as err:  # noqa: BLE001 - any unreadable file is named
            _fail(f"{path}: not readable as DICOM: {_one_line(err)}")
    geometry = _geometry(files, datasets, spacing_tolerance=spacing_tolerance)
    native = np.empty((geometry.columns, geometry.rows, len(files)), dtype=np.float32)
    for k, (path, ds) in enumerate(zip(geometry.files, geometry.datasets, strict=True)):
        native[:, :, k] = _decode_slice(path, ds).T  # pixel_array is (row, column)
    volume, affine = _reorient_to_ras(native, geometry.lps_affine)
    log.info(
        "%s: %d slices, %dx%d, RAS shape %s",
        files[0].parent,
        len(files),
        geometry.rows,
        geometry.columns,
        volume.shape,
    )
    return volume.astype(np.float32, copy=False), affine


# --- DICOM SEG --------------------------------------------------------------------------
def _frame_item(ds: Dataset, frame: int, keyword: str) -> Any:
    """An item of a functional group: per-frame first, else shared."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(group, None)
        if not items:
            continue
        item = items[frame] if group.startswith("PerFrame") else items[0]
        if keyword in item and len(item[keyword].value):
            return item[keyword].value[0]
    return None


def load_dicom_seg(seg_path: Path, series: DicomSeries) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM SEG into a label map on the RAS grid of the series it segments.

    Each frame is placed by its ImagePositionPatient (PlanePositionSequence) on the
    series' slices and given its segment's number (ReferencedSegmentNumber). BINARY
    segments are taken as they are; FRACTIONAL ones at half their maximum. Where
    segments overlap, the higher segment number wins (logged).

    Parameters
    ----------
    seg_path : the SEG file.
    series : the image series it references (see ``DicomSeries.seg_files``).

    Returns
    -------
    labels : uint16 array shaped and oriented like ``load_dicom_series(series)[0]``;
        0 is background, otherwise the SegmentNumber.
    names : SegmentNumber to SegmentLabel.

    Raises
    ------
    IngestError
        Naming the file: not a SEG; frames whose size or orientation differ from the
        series'; a frame lying on no slice of the series; undecodable pixels.
    """
    import pydicom

    seg_path = Path(seg_path)
    try:
        seg = pydicom.dcmread(seg_path, force=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        _fail(f"{seg_path}: not readable as DICOM: {_one_line(err)}")
    if str(seg.get("Modality", "")) != SEG_MODALITY:
        _fail(f"{seg_path}: Modality is {seg.get('Modality', '(none)')!r}, not a DICOM SEG")
    headers = []
    for path in series.files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        except Exception as err:  # noqa: BLE001 - any unreadable file is named
            _fail(f"{path}: not readable as DICOM: {_one_line(err)}")
    geometry = _geometry(series.files, headers, spacing_tolerance=1.0)
    if (int(seg.get("Rows", 0) or 0), int(seg.get("Columns", 0) or 0)) != (geometry.rows, geometry.columns):
        _fail(
            f"{seg_path}: frames are {seg.get('Rows')}x{seg.get('Columns')}, the series' images "
            f"{geometry.rows}x{geometry.columns}"
        )
    names = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in seg.get("SegmentSequence", [])
    }
    try:
        frames = np.asarray(seg.pixel_array)
    except Exception as err:  # noqa: BLE001 - any decoder failure is named
        _fail(f"{seg_path}: pixel data failed to decode: {_one_line(err)}")
    if frames.ndim == 2:
        frames = frames[None]
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames > float(seg.get("MaximumFractionalValue", 255)) / 2
    native = np.zeros((geometry.columns, geometry.rows, len(geometry.files)), dtype=np.uint16)
    half_gap = 0.5 * (float(np.median(np.diff(geometry.positions))) if len(geometry.positions) > 1 else 1.0)
    half_pixel = 0.5 * float(min(np.linalg.norm(geometry.lps_affine[:3, :2], axis=0)))
    overlap = 0
    placed: list[tuple[int, int, int]] = []  # (segment number, slice, frame)
    for f in range(len(frames)):
        position = _frame_item(seg, f, "PlanePositionSequence")
        orientation = _frame_item(seg, f, "PlaneOrientationSequence")
        segment = _frame_item(seg, f, "SegmentIdentificationSequence")
        if position is None or orientation is None or segment is None:
            _fail(f"{seg_path}: frame {f + 1} has no plane position, plane orientation or segment number")
        iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
        if not np.allclose(iop, geometry.orientation, atol=1e-4):
            _fail(
                f"{seg_path}: frame {f + 1} orientation differs from the series' (resampling is not "
                "supported)"
            )
        ipp = np.array([float(v) for v in position.ImagePositionPatient])
        k = int(np.argmin(np.abs(geometry.positions - ipp @ geometry.normal)))
        offset = ipp - (geometry.lps_affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        along = float(offset @ geometry.normal)
        across = float(np.linalg.norm(offset - along * geometry.normal))
        if abs(along) > half_gap or across > half_pixel:
            _fail(f"{seg_path}: frame {f + 1} at {ipp.tolist()} lies on no slice of series {series.uid}")
        placed.append((int(segment.ReferencedSegmentNumber), k, f))
    for number, k, f in sorted(placed):  # ascending, so the higher segment number wins overlaps
        mask = frames[f].T.astype(bool)
        overlap += int(np.count_nonzero(native[:, :, k][mask]))
        native[:, :, k][mask] = number
    if overlap:
        log.warning(
            "%s: %d voxels in more than one segment; the higher segment number kept", seg_path, overlap
        )
    labels, _ = _reorient_to_ras(native, geometry.lps_affine)
    return labels, names
