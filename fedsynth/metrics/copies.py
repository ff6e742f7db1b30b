"""Copy detection through disguises: is an image a training image mirrored, rotated,
zoomed, shifted or with another intensity curve?

A generator rarely returns a training slice pixel for pixel; it returns it mirrored,
turned a few degrees, a little zoomed or shifted, with another contrast. A plain distance
(pixels, PCA, a learned encoder) puts such a copy as far from its original as an
unrelated slice. Here the distance between a query and a reference image is taken after
the disguise is undone:

1. **Candidates.** Each image is described by a vector that none of those changes moves:
   the image is blurred and sampled on a polar grid around its intensity centroid, with
   radii scaled by its radius of gyration (shift and zoom drop out); the samples are
   replaced by their ranks (any monotone intensity curve drops out); the magnitudes of
   their Fourier transform along the angle are kept (rotation and mirror drop out). The
   ``candidates`` nearest reference images in that descriptor are searched exactly.
2. **Pose.** For each candidate the rotation, and whether the query is mirrored, come
   from the cross-correlation of the two polar samplings; the zoom from the radii, the
   shift from the centroids. The best-correlated ``refine`` candidates are aligned
   further by Gauss-Newton steps on the angle, zoom and shift, the query's intensity
   curve matched to the candidate's.
3. **Distance.** The query is warped into the candidate's frame; the candidate is passed
   through the same resampling (to the query's frame and back, in one step or in two), so
   interpolation is not counted as a difference; the query's intensity curve is matched
   to the candidate's; both are blurred and halved in resolution. The distance is the
   root-mean-square difference over the pixels both cover, as a share of the intensity
   range. An exact copy scores 0.

Whether a distance is small is never decided here: the audit compares it with the
distances of fresh real images (holdout to train) found the same way, so false alarms
stay calibrated on the data itself.

:data:`COVERS` and :data:`NOT_COVERED` say what the search undoes and what it does not;
the report repeats them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from fedsynth.core.progress import Progress
from fedsynth.metrics.neighbours import nearest

__all__ = ["COVERS", "NOT_COVERED", "CopyDetector", "CopyIndex", "Matches", "describe_pose"]

#: What the search undoes, with the ranges calibrated on real brain MRI
#: (``benchmarks/copy_detection.py`` measures the detection rate against each strength).
COVERS = [
    "left-right and up-down mirror",
    "rotation by any angle (measured up to 45 degrees)",
    "zoom in or out (measured from 0.8x to 1.15x; 85% of copies caught at 1.2x on brain MRI)",
    "shift (measured up to 3 pixels at 64 px)",
    "a monotone change of the intensity curve (gamma, windowing, contrast; measured for gamma 0.5 to 1.4: "
    "from gamma 2, 8-bit rounding erases the dark range and about half the copies are missed)",
    "pixel noise and the blur of resampling (in one step or two: turned then scaled, or scaled then turned)",
]
#: What it does not undo.
NOT_COVERED = [
    "crops that keep only part of the slice",
    "elastic or local deformations",
    "local edits (a lesion pasted into a training slice, an inpainted region)",
    "non-monotone intensity changes (an inverted or re-coloured slice)",
    "copies assembled from pieces of several training slices",
]

_WORK = 64  # working size in pixels: every image is resampled to it
_RADII, _ANGLES, _HARMONICS = 16, 64, 10
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


@dataclass
class CopyIndex:
    """Images prepared for the search: working-size pixels, moments, polar samples, and
    the invariant descriptors (one row per image)."""

    pixels: torch.Tensor  # (N, 1, 64, 64) uint8 (a quarter of the memory of floats at 50,000 images)
    centroid: torch.Tensor  # (N, 2) x, y in [-1, 1]
    radius: torch.Tensor  # (N,) radius of gyration
    polar: torch.Tensor  # (N, radii, angles), ranks, zero mean
    descriptors: np.ndarray  # (N, radii * harmonics) float32
    size: int  # the images' own side in pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def subset(self, rows: np.ndarray) -> CopyIndex:
        """The prepared images at ``rows``, in that order."""
        at = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return CopyIndex(
            self.pixels[at],
            self.centroid[at],
            self.radius[at],
            self.polar[at],
            self.descriptors[rows],
            self.size,
        )


@dataclass
class Matches:
    """For each query: the distance to its nearest reference image after the disguise is
    undone, that image's index, and the pose found (``theta`` maps the reference's frame
    into the query's, in the normalised coordinates of ``torch.nn.functional.affine_grid``)."""

    distance: np.ndarray  # (N,) float32
    index: np.ndarray  # (N,) int64
    theta: np.ndarray  # (N, 2, 3) float32


def describe_pose(theta: np.ndarray, size: int) -> str:
    """The disguise a pose undoes, in words: "mirrored, rotated 8° clockwise, zoomed
    1.08x, shifted by (+2, -1) px" (x right, y down), or "same pose" when the geometry is
    unchanged (the intensity curve, matched before measuring, is not named).

    ``theta`` is one row of :attr:`Matches.theta`; ``size`` the images' side in pixels.
    """
    a = np.asarray(theta, dtype=np.float64)[:, :2]
    det = float(np.linalg.det(a))
    mirrored = det < 0
    zoom = math.sqrt(abs(det))
    if mirrored:  # a = z Rot(angle) diag(-1, 1)
        angle = math.degrees(math.atan2(-a[1, 0], -a[0, 0]))
    else:
        angle = math.degrees(math.atan2(a[1, 0], a[0, 0]))
    words = []
    if mirrored:
        words.append("mirrored")
    if abs(angle) >= 1:  # x right, y down: a positive angle turns clockwise on screen
        words.append(f"rotated {abs(angle):.0f}° {'clockwise' if angle > 0 else 'anticlockwise'}")
    if abs(zoom - 1) >= 0.01:
        words.append(f"zoomed {zoom:.2f}x")
    # where the reference's centre lands in the query, in the query's pixels (x right, y down)
    dx, dy = np.asarray(theta, dtype=np.float64)[:, 2] * size / 2
    if max(abs(dx), abs(dy)) >= 0.5:
        words.append(f"shifted by ({round(dx):+d}, {round(dy):+d}) px")
    return ", ".join(words) or "same pose"


class CopyDetector:
    """Nearest images after undoing mirror, rotation, zoom, shift and intensity curve.

    Parameters
    ----------
    candidates : reference images per query taken from the invariant descriptor.
    refine : of those, how many (best-correlated first) are aligned by Gauss-Newton and
        measured.
    steps : Gauss-Newton steps per alignment.
    block : queries per batch (memory: about 1 MB per query and refined candidate).
    """

    name = "pixels"

    def __init__(self, *, candidates: int = 10, refine: int = 2, steps: int = 2, block: int = 128) -> None:
        if candidates < 1 or not 1 <= refine <= candidates or steps < 0 or block < 1:
            raise ValueError(
                f"copy detector: candidates={candidates}, refine={refine}, steps={steps}, block={block}"
            )
        self.candidates, self.refine, self.steps, self.block = candidates, refine, steps, block

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "pixels, aligned: the disguise is undone before the distance is taken",
            "distance": "RMS difference at half resolution after a light blur, as a share of the intensity "
            "range, after alignment and intensity-curve matching",
            "covers": COVERS,
            "does_not_cover": NOT_COVERED,
            "candidates": self.candidates,
            "refined": self.refine,
            "gauss_newton_steps": self.steps,
            "working_size": _WORK,
        }

    # --- preparing images -------------------------------------------------------------------------

    def index(self, images: np.ndarray) -> CopyIndex:
        """Prepare uint8 images (N, H, W) for the search (a few seconds for 50,000)."""
        if images.ndim != 3 or len(images) == 0:
            raise ValueError(f"copy detector: expected images (N, H, W), got shape {images.shape}")
        parts = [_prepare(images[s : s + 4096]) for s in range(0, len(images), 4096)]
        return CopyIndex(
            pixels=torch.cat([p[0] for p in parts]),
            centroid=torch.cat([p[1] for p in parts]),
            radius=torch.cat([p[2] for p in parts]),
            polar=torch.cat([p[3] for p in parts]),
            descriptors=np.concatenate([p[4] for p in parts]),
            size=int(images.shape[1]),
        )

    # --- the search -------------------------------------------------------------------------------

    def nearest(
        self,
        queries: CopyIndex,
        reference: CopyIndex,
        *,
        exclude: np.ndarray | None = None,
        progress: Progress | None = None,
    ) -> Matches:
        """The nearest reference image of every query, after undoing its disguise.

        ``exclude``: per query, a reference row that may not be its match (its own row,
        when the queries are reference images; a duplicate elsewhere still is).
        """
        k = min(self.candidates, len(reference) - (1 if exclude is not None else 0))
        if k < 1:
            raise ValueError(f"copy detector: {len(reference)} reference images are too few")
        _, cand = nearest(queries.descriptors, reference.descriptors, k=k, exclude=exclude)
        n = len(queries)
        out_d = np.empty(n, dtype=np.float32)
        out_i = np.empty(n, dtype=np.int64)
        out_t = np.empty((n, 2, 3), dtype=np.float32)
        top = min(self.refine, k)
        with torch.no_grad():
            for start in range(0, n, self.block):
                stop = min(start + self.block, n)
                q = torch.arange(start, stop)
                c = torch.from_numpy(cand[start:stop])  # (B, k)
                mirror, angle, score = _polar_pose(
                    queries.polar[q.repeat_interleave(k)], reference.polar[c.flatten()]
                )
                best = score.view(-1, k).topk(top, dim=1).indices  # (B, top)
                pick = (torch.arange(len(q))[:, None] * k + best).flatten()
                qi, ci = q.repeat_interleave(k)[pick], c.flatten()[pick]
                theta0 = _theta(
                    mirror[pick],
                    angle[pick],
                    torch.log(queries.radius[qi] / reference.radius[ci]),
                    queries.centroid[qi],
                    reference.centroid[ci],
                    torch.zeros(len(qi), 2),
                )
                qx, cx = _unit(queries.pixels[qi]), _unit(reference.pixels[ci])
                theta = _refine(qx, cx, theta0, mirror[pick], self.steps)
                dist = _distance(qx, cx, theta).view(-1, top)
                thetas = theta.view(-1, top, 2, 3)
                j = dist.argmin(1)
                rows = torch.arange(len(q))
                out_d[start:stop] = dist[rows, j].numpy()
                out_i[start:stop] = ci.view(-1, top)[rows, j].numpy()
                out_t[start:stop] = thetas[rows, j].numpy()
                if progress:
                    progress(stop, n)
        return Matches(out_d, out_i, out_t)

    def features(self, index: CopyIndex) -> np.ndarray:
        """The invariant descriptors, as a feature space (for clustering and densities)."""
        return index.descriptors

    @staticmethod
    def align(query: np.ndarray, theta: np.ndarray, *, block: int = 4096) -> np.ndarray:
        """Query images, uint8 (H, W) or (N, H, W), with their disguise undone: each warped
        into its matched reference image's frame (``theta``: (2, 3) or (N, 2, 3)), at its
        own size (poses are in normalised coordinates, so any size)."""
        single = query.ndim == 2
        images = query[None] if single else query
        thetas = np.asarray(theta, dtype=np.float32).reshape(-1, 2, 3)
        out = np.empty_like(images, dtype=np.uint8)
        for start in range(0, len(images), block):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + block], dtype=np.float32))[
                :, None
            ]
            th = torch.from_numpy(thetas[start : start + block])
            grid = F.affine_grid(th, list(x.shape), align_corners=False)
            warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
            out[start : start + len(x)] = warped.clamp(0, 255).round().to(torch.uint8).numpy()
        return out[0] if single else out


# --- the steps ------------------------------------------------------------------------------------


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 255.0


def _blur_matrix(size: int, times: int) -> torch.Tensor:
    """The 5-tap binomial blur along one axis, edges repeated, ``times`` over, as a matrix."""
    m = torch.zeros(size, size)
    for i in range(size):
        for offset, weight in zip(range(-2, 3), _BINOMIAL.tolist(), strict=True):
            m[i, min(max(i + offset, 0), size - 1)] += weight
    return torch.linalg.matrix_power(m, times)


_BLUR = {times: _blur_matrix(_WORK, times) for times in (1, 2, 4)}


def _blur(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """The 5-tap binomial blur of (N, 1, 64, 64) images, ``times`` over (two matrix products:
    faster on a CPU than a convolution of one channel)."""
    m = _BLUR[times]
    return m @ x @ m.T


def _order(v: torch.Tensor) -> torch.Tensor:
    """Each row's values replaced by their rank, 0 to columns - 1 (one sort)."""
    index = v.argsort(1)
    return torch.empty_like(index).scatter_(1, index, torch.arange(v.shape[1]).expand_as(index))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Each row's values replaced by their rank in [0, 1]."""
    return _order(v).float() / max(v.shape[1] - 1, 1)


def _coords(size: int) -> torch.Tensor:
    return (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres, align_corners=False


def _prepare(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None] / 255.0
    if x.shape[-1] != _WORK or x.shape[-2] != _WORK:
        x = F.interpolate(x, size=(_WORK, _WORK), mode="bilinear", antialias=True, align_corners=False)
    b = _blur(x)
    # moments weighted by each pixel's rank within the foreground: no monotone intensity
    # curve moves them, nor a black border added by a zoom out or a shift
    flat = b.flatten(1)
    ranks = _ranks(flat)
    # the foreground: brighter than Otsu's threshold; ranks within it
    foreground = flat > _otsu(flat)
    background = 1 - foreground.float().mean(1, keepdim=True)
    within = ((ranks - background) / (1 - background).clamp_min(1e-3)).clamp(0, 1)
    weight = within.view(-1, _WORK, _WORK)
    mass = weight.sum((1, 2)).clamp_min(1e-6)
    lin = _coords(_WORK)
    cx = (weight.sum(1) * lin).sum(1) / mass
    cy = (weight.sum(2) * lin).sum(1) / mass
    d2 = (lin[None, None, :] - cx[:, None, None]) ** 2 + (lin[None, :, None] - cy[:, None, None]) ** 2
    radius = ((weight * d2).sum((1, 2)) / mass).sqrt().clamp_min(0.05)
    centroid = torch.stack([cx, cy], 1)
    # the polar sampling: radii out to 1.6 radii of gyration, scaled to each image
    r = torch.linspace(0.05, 1.6, _RADII)[None, :, None] * radius[:, None, None]
    phi = torch.arange(_ANGLES) * (2 * math.pi / _ANGLES)
    grid = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], -1) + centroid[:, None, None, :]
    polar = F.grid_sample(
        _blur(x, times=2), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[:, 0]
    polar = _ranks(polar.flatten(1)).view_as(polar)
    polar = polar - polar.mean((1, 2), keepdim=True)
    spectrum = torch.fft.rfft(polar, dim=2).abs()[:, :, :_HARMONICS] / _ANGLES
    stored = (x * 255).round().to(torch.uint8)
    return stored, centroid, radius, polar, spectrum.flatten(1).numpy().astype(np.float32)


def _otsu(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each row of values in [0, 1] (as a column): the cut between the
    dark background and the body that best separates the two, wherever a monotone
    intensity curve has moved them."""
    index = (values.clamp(0, 1) * bins).long().clamp_max(bins - 1)
    counts = torch.zeros(len(values), bins).scatter_add_(1, index, torch.ones_like(values))
    p = counts / counts.sum(1, keepdim=True)
    centres = (torch.arange(bins) + 0.5) / bins
    w0 = p.cumsum(1)
    m0 = (p * centres).cumsum(1)
    total = m0[:, -1:]
    between = (total * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-9)
    return ((between[:, :-1].argmax(1) + 1).float() / bins)[:, None]


def _polar_pose(pq: torch.Tensor, pc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror (+1 / -1), rotation angle (radians) and correlation for pairs of polar
    samplings, by circular cross-correlation along the angle."""
    spectrum_c = torch.fft.rfft(pc, dim=2).conj()
    norm = pq.flatten(1).norm(dim=1) * pc.flatten(1).norm(dim=1) + 1e-9
    best: list[torch.Tensor] = []
    # the mirrored query's sampling is the sequence reversed: q(-phi) (an up-down mirror;
    # the left-right one is that turned by 180 degrees, which the angle search covers)
    for mirrored, samples in ((False, pq), (True, pq.flip(2).roll(1, 2))):
        corr = torch.fft.irfft((torch.fft.rfft(samples, dim=2) * spectrum_c).sum(1), n=_ANGLES, dim=1)
        value, k = corr.max(1)
        left = corr.gather(1, ((k - 1) % _ANGLES)[:, None])[:, 0]
        right = corr.gather(1, ((k + 1) % _ANGLES)[:, None])[:, 0]
        offset = (0.5 * (left - right) / (left - 2 * value + right).clamp(max=-1e-9)).clamp(-0.5, 0.5)
        angle = (k.float() + offset) * (2 * math.pi / _ANGLES)
        score = value / norm
        if mirrored:  # z Rot(-a) diag(1, -1) == z Rot(pi - a) diag(-1, 1)
            angle = math.pi - angle
        sign = torch.full_like(score, -1.0 if mirrored else 1.0)
        if not best:
            best = [sign, angle, score]
        else:
            better = score > best[2]
            best = [
                torch.where(better, new, old) for new, old in zip((sign, angle, score), best, strict=True)
            ]
    return best[0], best[1], best[2]


def _theta(
    mirror: torch.Tensor,
    angle: torch.Tensor,
    log_zoom: torch.Tensor,
    centroid_q: torch.Tensor,
    centroid_c: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """The affine map from the reference's frame to the query's: x -> c_q + A (x - c_c) +
    shift, A = zoom * Rot(angle) * diag(mirror, 1)."""
    z = torch.exp(log_zoom)
    cos, sin = torch.cos(angle) * z, torch.sin(angle) * z
    a = torch.stack([torch.stack([cos * mirror, -sin], -1), torch.stack([sin * mirror, cos], -1)], -2)
    b = centroid_q - (a @ centroid_c[..., None])[..., 0] + shift
    return torch.cat([a, b[..., None]], -1)


def _pose_parameters(theta: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle and log-zoom of the linear part of ``theta``."""
    a = theta[..., :2]
    log_zoom = 0.5 * torch.log(torch.linalg.det(a).abs().clamp_min(1e-12))
    angle = torch.atan2(a[:, 1, 0] * mirror, a[:, 0, 0] * mirror)
    return angle, log_zoom


# pixel centres (x, y) at the working size
_BASE = torch.stack(torch.meshgrid(_coords(_WORK), _coords(_WORK), indexing="xy"), -1).view(-1, 2)


def _grid(theta: torch.Tensor) -> torch.Tensor:
    """``affine_grid`` of (N, 2, 3) poses at the working size, as one batched product."""
    n = len(theta)
    grid = torch.baddbmm(theta[:, None, :, 2], _BASE.expand(n, -1, -1), theta[..., :2].transpose(1, 2))
    return grid.view(n, _WORK, _WORK, 2)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, _grid(theta), mode="bilinear", padding_mode="zeros", align_corners=False)


def _inverse(theta: torch.Tensor) -> torch.Tensor:
    inv = torch.linalg.inv(theta[..., :2])
    return torch.cat([inv, -inv @ theta[..., 2:]], -1)


def _quantiles(
    values: torch.Tensor, valid: torch.Tensor, probs: torch.Tensor, bins: int = 1024
) -> torch.Tensor:
    """Quantiles of each row's ``valid`` values in [0, 1] at ``probs``, from a histogram of
    ``bins`` bins, linear within a bin (no sort: a scatter and a cumulative sum)."""
    index = (values.clamp(0, 1) * bins).long().clamp_max(bins - 1)
    counts = torch.zeros(len(values), bins).scatter_add_(1, index, valid.float())
    cdf = counts.cumsum(1)
    total = cdf[:, -1:].clamp_min(1)
    target = probs[None] * total
    b = torch.searchsorted(cdf, target.contiguous()).clamp_max(bins - 1)
    below = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    inside = counts.gather(1, b).clamp_min(1e-9)
    return (b + ((target - below) / inside).clamp(0, 1)) / bins


_PROBS = torch.linspace(0, 1, 129)


def _curve(seen: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The monotone curve, piecewise linear through quantiles (as (N, knots, 2)), that maps
    the intensities of ``seen`` onto those of ``target`` over the ``valid`` pixels ((N, 1,
    H, W) images, both in the same frame). The end knots are the extremes, so an image
    matched to itself comes back unchanged."""
    flat_valid = valid.flatten(1)
    knots = []
    for values in (seen.flatten(1), target.flatten(1)):
        k = _quantiles(values, flat_valid, _PROBS)
        low = torch.where(flat_valid, values, 10.0).min(1, keepdim=True).values.clamp_max(1.0)
        high = torch.where(flat_valid, values, -10.0).max(1, keepdim=True).values.clamp_min(0.0)
        k[:, :1], k[:, -1:] = low, high
        knots.append(torch.maximum(k, low).minimum(high))
    # knots may repeat (a flat stretch of the histogram); _apply_curve takes the first of equal knots
    return torch.stack(knots, -1)


def _apply_curve(x: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """Images through their rows' curves (from :func:`_curve`); beyond the end knots the
    curve is flat. A value equal to a knot maps to that knot's value exactly, so an image
    through the curve matched to itself comes back unchanged."""
    xs, ys = curve[..., 0].contiguous(), curve[..., 1]
    flat = x.flatten(1).contiguous()
    i = torch.searchsorted(xs, flat).clamp(1, xs.shape[1] - 1)
    x0, x1, y0, y1 = xs.gather(1, i - 1), xs.gather(1, i), ys.gather(1, i - 1), ys.gather(1, i)
    t = ((flat - x0) / (x1 - x0).clamp_min(1e-9)).clamp(0, 1)
    return (y0 + t * (y1 - y0)).view_as(x)


def _match_curve(q: torch.Tensor, c: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``q`` through the monotone curve that maps its intensities seen in ``c``'s frame
    onto ``c``'s, over the pixels both cover."""
    valid = _warp(torch.ones_like(q), theta) > 0.99
    return _apply_curve(q, _curve(_warp(q, theta), c, valid))


def _refine(
    q: torch.Tensor, c: torch.Tensor, theta: torch.Tensor, mirror: torch.Tensor, steps: int
) -> torch.Tensor:
    """Gauss-Newton (Levenberg-Marquardt damped) on angle, log-zoom and shift, minimising
    the squared difference of the blurred images after a per-pair gain and offset, the
    query's intensity curve first matched to the reference's: ``steps`` steps on strongly
    blurred images (a wide basin, for a start a few degrees or percent off), then ``steps``
    on the images themselves (precision)."""
    if steps == 0:
        return theta
    n = len(q)
    angle, log_zoom = _pose_parameters(theta, mirror)
    b0 = theta[..., 2]
    shift = torch.zeros(n, 2)
    matched = _match_curve(q, c, theta)
    angle, log_zoom, shift = _gauss_newton(
        _blur(matched, 4), _blur(c, 4), mirror, b0, angle, log_zoom, shift, steps
    )
    angle, log_zoom, shift = _gauss_newton(matched, c, mirror, b0, angle, log_zoom, shift, steps)
    return _pose(mirror, angle, log_zoom, b0, shift)


def _pose(
    mirror: torch.Tensor,
    angle: torch.Tensor,
    log_zoom: torch.Tensor,
    offset: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """[A | offset + shift], A = zoom * Rot(angle) * diag(mirror, 1) (turning about the frame's centre)."""
    zero = torch.zeros_like(shift)
    a = _theta(mirror, angle, log_zoom, zero, zero, zero)[..., :2]
    return torch.cat([a, (offset + shift)[..., None]], -1)


def _gauss_newton(
    qb: torch.Tensor,
    cb: torch.Tensor,
    mirror: torch.Tensor,
    offset: torch.Tensor,
    angle: torch.Tensor,
    log_zoom: torch.Tensor,
    shift: torch.Tensor,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` damped Gauss-Newton steps from (angle, log_zoom, shift), aligning ``qb``
    to ``cb`` (working-size images)."""
    n = len(qb)
    scale = _WORK / 2  # d/d(normalised coordinate) = size/2 * d/d(pixel)
    padded_x = F.pad(qb, (1, 1, 0, 0), mode="replicate")
    padded_y = F.pad(qb, (0, 0, 1, 1), mode="replicate")
    gx = (padded_x[..., 2:] - padded_x[..., :-2]) * (scale / 2)
    gy = (padded_y[..., 2:, :] - padded_y[..., :-2, :]) * (scale / 2)
    stack = torch.cat([qb, gx, gy], 1)
    base = _BASE.expand(n, -1, -1)
    target = cb.flatten(1)
    damping = torch.full((n,), 1e-3)

    def residual(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = _grid(th)
        sampled = F.grid_sample(
            stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        ).flatten(2)
        valid = (grid.abs() <= 1).all(-1).flatten(1).float()
        w = sampled[:, 0]
        count = valid.sum(1, keepdim=True).clamp_min(1)
        w_mean = (w * valid).sum(1, keepdim=True) / count
        t_mean = (target * valid).sum(1, keepdim=True) / count
        gain = ((w - w_mean) * (target - t_mean) * valid).sum(1, keepdim=True) / (
            ((w - w_mean) ** 2 * valid).sum(1, keepdim=True) + 1e-8
        )
        r = (gain * (w - w_mean) + t_mean - target) * valid
        cost = (r**2).sum(1) / count[:, 0]
        return r, sampled * (gain * valid)[:, None, :], cost

    th = _pose(mirror, angle, log_zoom, offset, shift)
    r, sampled, cost = residual(th)
    for _ in range(steps):
        ix, iy = sampled[:, 1], sampled[:, 2]
        z = torch.exp(log_zoom)
        cos, sin = torch.cos(angle) * z, torch.sin(angle) * z
        d_a = torch.stack([torch.stack([-sin * mirror, -cos], -1), torch.stack([cos * mirror, -sin], -1)], -2)
        d_angle = base @ d_a.transpose(1, 2)  # (n, pixels, 2): how each sampling point moves
        d_zoom = base @ th[..., :2].transpose(1, 2)
        jac = torch.stack(
            [ix * d_angle[..., 0] + iy * d_angle[..., 1], ix * d_zoom[..., 0] + iy * d_zoom[..., 1], ix, iy],
            -1,
        )
        hess = jac.transpose(1, 2) @ jac
        grad = (jac.transpose(1, 2) @ r[..., None])[..., 0]
        damped = hess + damping[:, None, None] * torch.diag_embed(hess.diagonal(dim1=1, dim2=2) + 1e-6)
        step = torch.linalg.solve(damped, -grad).clamp(-0.2, 0.2)
        new = (angle + step[:, 0], log_zoom + step[:, 1], shift + step[:, 2:])
        new_th = _pose(mirror, *new[:2], offset, new[2])
        new_r, new_sampled, new_cost = residual(new_th)
        better = new_cost < cost
        angle = torch.where(better, new[0], angle)
        log_zoom = torch.where(better, new[1], log_zoom)
        shift = torch.where(better[:, None], new[2], shift)
        th = torch.where(better[:, None, None], new_th, th)
        r = torch.where(better[:, None], new_r, r)
        sampled = torch.where(better[:, None, None], new_sampled, sampled)
        cost = torch.where(better, new_cost, cost)
        damping = torch.where(better, damping * 0.5, damping * 10)
    return angle, log_zoom, shift


def _distance(q: torch.Tensor, c: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """RMS difference of the query in the reference's frame and the reference through the
    same resampling, intensity curve matched, blurred, at half resolution, over the pixels
    both cover.

    A copy has been resampled once per step of its disguise and once more here; the
    reference goes to the query's frame and back the same way, in one step, or in two
    (turning then scaling, or scaling then turning: two resamplings leave a residue one
    cannot imitate), and the closest of the three counts. So interpolation is not counted
    as a difference, while two different slices stay as far apart as they are.
    """
    warped = _warp(q, theta)
    inside = _warp(torch.ones_like(q), theta)
    covered = F.avg_pool2d(inside, 2).flatten(1) > 0.99
    turn, scale, scale_first, turn_after = _split_pose(theta)
    references = [
        _warp(_warp(c, _inverse(theta)), theta),
        _warp(_warp(_warp(c, _inverse(turn)), _inverse(scale)), theta),
        _warp(_warp(_warp(c, _inverse(scale_first)), _inverse(turn_after)), theta),
    ]
    best = None
    for reference in references:
        curve = _curve(warped, reference, inside > 0.99)
        a = F.avg_pool2d(_blur(_apply_curve(warped, curve), times=2), 2).flatten(1)
        b = F.avg_pool2d(_blur(reference, times=2), 2).flatten(1)
        d = (((a - b) ** 2 * covered).sum(1) / covered.sum(1).clamp_min(1)).sqrt()
        best = d if best is None else torch.minimum(best, d)
    assert best is not None
    return best


def _split_pose(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pose x -> A x + b, A = zoom * (turn and mirror), as two steps, both ways round:
    (turn, then scale and shift) and (scale, then turn and shift)."""
    a, b = theta[..., :2], theta[..., 2:]
    zoom = torch.linalg.det(a).abs().sqrt()[:, None, None]
    turn = a / zoom
    zero = torch.zeros_like(b)
    scaled = zoom * torch.eye(2).expand_as(a)
    return (
        torch.cat([turn, zero], -1),
        torch.cat([scaled, b], -1),
        torch.cat([scaled, zero], -1),
        torch.cat([turn, b], -1),
    )
