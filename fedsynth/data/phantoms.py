"""Phantom hospitals: CT-like abdominal volumes with liver lesions, per-scanner character.

Nothing here is patient data. Each phantom patient is a short stack of axial slices in
Hounsfield units with a LiTS-style label map (1 = liver, 2 = lesion), and each hospital
has its own scanner character (noise, soft-tissue contrast, field of view, blur) and its
own lesion prevalence, so the hospitals are non-IID the way real sites are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "DEFAULT_HOSPITALS",
    "LESION",
    "LIVER",
    "PhantomPatient",
    "ScannerProfile",
    "render_patient",
    "write_phantom_hospitals",
]

LIVER, LESION = 1, 2


@dataclass(frozen=True)
class ScannerProfile:
    """What makes one hospital's images look like that hospital's.

    Attributes
    ----------
    name : hospital name (becomes the site).
    patients : phantom patients (volumes) at this hospital.
    noise_hu : standard deviation of (spatially correlated) noise, HU.
    contrast : soft-tissue contrast relative to a reference scanner.
    fov : share of the image the body spans (small fov: body fills the image).
    blur : in-plane blur (resolution), pixels.
    lesion_prevalence : chance that a patient has liver lesions.
    """

    name: str
    patients: int
    noise_hu: float
    contrast: float
    fov: float
    blur: float
    lesion_prevalence: float


DEFAULT_HOSPITALS: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        "hospital-a", patients=42, noise_hu=10, contrast=1.0, fov=0.88, blur=0.6, lesion_prevalence=0.6
    ),
    ScannerProfile(
        "hospital-b", patients=30, noise_hu=24, contrast=0.8, fov=0.74, blur=1.0, lesion_prevalence=0.3
    ),
    ScannerProfile(
        "hospital-c", patients=36, noise_hu=15, contrast=1.15, fov=0.95, blur=0.5, lesion_prevalence=0.85
    ),
)


@dataclass(frozen=True)
class PhantomPatient:
    """A rendered phantom: volume in HU (x, y, z in RAS) and its label map."""

    volume_hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]


def _ellipse_radius(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside, 1 on the boundary."""
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    x = (c * du + s * dv) / a
    y = (-s * du + c * dv) / b
    return np.sqrt(x * x + y * y)


def _soft(radius: np.ndarray, half_size: float, pixel: float, edge_px: float = 0.7) -> np.ndarray:
    """Anti-aliased inside-ness from a normalised radius: the edge is about ``edge_px``
    pixels wide (``half_size`` approximates the shape's extent, ``pixel`` is one pixel in
    grid units)."""
    distance_px = (radius - 1.0) * half_size / pixel
    return 1.0 / (1.0 + np.exp(np.clip(distance_px / edge_px, -50, 50)))


def render_patient(
    profile: ScannerProfile, rng: np.random.Generator, *, size: int = 128, slices: int = 16
) -> PhantomPatient:
    """Render one phantom patient as seen by ``profile``'s scanner.

    Returns the volume in HU and a label map (0 background, 1 liver, 2 lesion) in RAS
    voxel order, with 3 mm slices (portal-venous-phase-like contrast).
    """
    # Display grid: u to the image's right (the patient's left), v downwards (posterior).
    lin = np.linspace(-1, 1, size, dtype=np.float32)
    u, v = np.meshgrid(lin, lin)
    pixel = 2.0 / size
    sc = profile.fov

    def shape(
        cu: float, cv: float, a: float, b: float, angle: float = 0.0, edge_px: float = 0.7
    ) -> tuple[np.ndarray, np.ndarray]:
        radius = _ellipse_radius(u, v, cu, cv, a, b, angle)
        return _soft(radius, min(a, b), pixel, edge_px), radius < 1.0

    body_a, body_b = rng.uniform(0.82, 0.95) * sc, rng.uniform(0.58, 0.7) * sc
    body_cv = rng.uniform(-0.04, 0.04)
    fat = rng.uniform(0.1, 0.2) * sc
    liver_cu, liver_cv = -0.34 * sc + rng.uniform(-0.03, 0.03), -0.04 * sc + body_cv
    liver_a, liver_b = rng.uniform(0.34, 0.42) * sc, rng.uniform(0.3, 0.38) * sc
    liver_angle = rng.uniform(-0.35, 0.1)
    liver_hu = rng.uniform(95, 115)
    n_lesions = int(rng.integers(1, 4)) if rng.random() < profile.lesion_prevalence else 0
    lesions = []
    for _ in range(n_lesions):
        radius = rng.uniform(0.05, 0.13) * sc
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
        lesions.append(
            (
                liver_cu + rad * liver_a * np.cos(ang),
                liver_cv + rad * liver_b * np.sin(ang),
                rng.uniform(0.3, 0.9),  # height in the stack
                radius,
                rng.uniform(45, 85) if rng.random() < 0.8 else -rng.uniform(40, 70),  # HU below liver
            )
        )
    gas = [
        (rng.uniform(0.1, 0.4) * sc, rng.uniform(-0.35, -0.1) * sc, rng.uniform(0.025, 0.06) * sc)
        for _ in range(int(rng.integers(1, 5)))
    ]

    volume = np.zeros((slices, size, size), dtype=np.float32)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    half_fov_mm = 175.0
    for k in range(slices):
        z = (k + 0.5) / slices  # 0 inferior .. 1 superior
        img = np.full((size, size), -1000.0, dtype=np.float32)

        def paint(mask: np.ndarray, value: float, img: np.ndarray = img) -> None:
            img *= 1 - mask
            img += value * mask

        paint(shape(0.0, body_cv, body_a, body_b)[0], -100.0)  # subcutaneous fat
        paint(shape(0.0, body_cv, body_a - fat, body_b - fat)[0], 45.0)  # muscle wall
        paint(
            shape(0.0, body_cv - 0.02, body_a - fat - 0.05 * sc, body_b - fat - 0.06 * sc)[0], 20.0
        )  # abdomen
        for gu, gv, gr in gas:  # bowel / stomach gas
            paint(shape(gu, gv + body_cv, gr, gr * 0.8)[0], -900.0)
        grow = 0.55 + 0.45 * np.sin(np.pi * min(1.0, 0.2 + 0.9 * z))  # liver fullest high up
        liver_in, liver_mask = shape(liver_cu, liver_cv, liver_a * grow, liver_b * grow, liver_angle)
        paint(liver_in, liver_hu)
        if z > 0.45:  # spleen, on the patient's left, posterior
            paint(shape(0.52 * sc, 0.12 * sc + body_cv, 0.12 * sc, 0.22 * sc * (z - 0.3), 0.6)[0], 115.0)
        if z < 0.55:  # kidneys: enhancing cortex, darker pelvis
            for side in (-1, 1):
                cu, cv = side * 0.32 * sc, 0.28 * sc + body_cv
                paint(shape(cu, cv, 0.085 * sc, 0.13 * sc, side * 0.5)[0], 170.0)
                paint(shape(cu, cv, 0.04 * sc, 0.07 * sc, side * 0.5)[0], 30.0)
        paint(shape(0.05 * sc, 0.2 * sc + body_cv, 0.045 * sc, 0.045 * sc)[0], 180.0)  # aorta
        paint(shape(-0.09 * sc, 0.18 * sc + body_cv, 0.05 * sc, 0.035 * sc)[0], 130.0)  # IVC
        vert_v = 0.4 * sc + body_cv
        for side in (-1, 1):  # paraspinal muscles
            paint(shape(side * 0.17 * sc, vert_v + 0.1 * sc, 0.1 * sc, 0.09 * sc)[0], 50.0)
        paint(shape(0.0, vert_v, 0.1 * sc, 0.09 * sc)[0], 700.0)  # vertebral cortex
        paint(shape(0.0, vert_v, 0.08 * sc, 0.07 * sc)[0], 260.0)  # cancellous bone
        paint(shape(0.0, vert_v + 0.13 * sc, 0.04 * sc, 0.035 * sc)[0], 20.0)  # spinal canal
        lesion_mask = np.zeros((size, size), dtype=bool)
        for lu, lv, lz, radius, delta in lesions:
            dz = (z - lz) * slices * 3.0 / half_fov_mm  # height difference in grid units
            r2 = radius * radius - dz * dz
            if r2 <= (1.5 * pixel) ** 2:
                continue
            soft, hard = shape(lu, lv, np.sqrt(r2), np.sqrt(r2) * 0.85, edge_px=1.2)
            paint(soft * liver_in, liver_hu - delta)
            lesion_mask |= hard & liver_mask
        # scanner: contrast around soft tissue, blur, spatially correlated noise
        soft_tissue = (img > -200) & (img < 300)
        img = np.where(soft_tissue, 40.0 + (img - 40.0) * profile.contrast, img)
        img = gaussian_filter(img, profile.blur)
        noise = gaussian_filter(rng.normal(0, 1, img.shape).astype(np.float32), 0.8)
        volume[k] = img + noise / noise.std() * profile.noise_hu
        labels[k] = np.where(lesion_mask, LESION, np.where(liver_mask, LIVER, 0))

    # display (z, row, col) -> RAS voxel order (x, y, z): x runs to the patient's right,
    # which is the image's left; y runs anterior, which is the image's top.
    def to_ras(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, ::-1, ::-1].transpose(2, 1, 0))

    px_mm = 2 * half_fov_mm / size
    return PhantomPatient(
        volume_hu=np.clip(to_ras(volume), -1024, 3071),
        labels=to_ras(labels),
        spacing_mm=(px_mm, px_mm, 3.0),
    )


def write_phantom_hospitals(
    out: str | Path,
    *,
    hospitals: tuple[ScannerProfile, ...] = DEFAULT_HOSPITALS,
    seed: int = 0,
    size: int = 128,
    slices: int = 16,
) -> list[Path]:
    """Write each hospital's phantoms as NIfTI: ``OUT/<hospital>/volume-NNN.nii.gz`` (int16
    HU) beside ``segmentation-NNN.nii.gz`` (uint8 labels), RAS affine, 3 mm slices.

    Returns the volume paths.
    """
    import nibabel as nib

    out = Path(out)
    written = []
    for h, profile in enumerate(hospitals):
        folder = out / profile.name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, h])
        for p in range(profile.patients):
            patient = render_patient(profile, rng, size=size, slices=slices)
            affine = np.diag([*patient.spacing_mm, 1.0])
            affine[:3, 3] = [-175.0, -175.0, 0.0]
            vol = nib.Nifti1Image(np.round(patient.volume_hu).astype(np.int16), affine)
            vol.header.set_xyzt_units("mm")
            seg = nib.Nifti1Image(patient.labels.astype(np.uint8), affine)
            seg.header.set_xyzt_units("mm")
            path = folder / f"volume-{p:03d}.nii.gz"
            nib.save(vol, path)
            nib.save(seg, folder / f"segmentation-{p:03d}.nii.gz")
            written.append(path)
    return written
