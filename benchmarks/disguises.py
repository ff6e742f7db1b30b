"""The disguises a generator returns training slices under, for calibrating the copy
detector: mirror, rotation, zoom, intensity curve (gamma), shift and noise.

Written with SciPy, independently of the detector's own resampling (PyTorch), so a test
that undoes them measures the detector, not the inverse of its own code. Each takes and
returns uint8 images (N, H, W); the background uncovered by a rotation, a zoom out or a
shift is black, as a slice's background is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

Disguise = Callable[[np.ndarray], np.ndarray]


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def mirror(images: np.ndarray) -> np.ndarray:
    """Left-right mirror."""
    return np.ascontiguousarray(images[:, :, ::-1])


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Turned about the centre, bilinear (positive: anticlockwise on screen)."""
    return _uint8(
        np.stack([ndimage.rotate(i.astype(np.float32), degrees, reshape=False, order=1, cval=0.0) for i in images])
    )


def zoom(images: np.ndarray, factor: float) -> np.ndarray:
    """Scaled about the centre by ``factor`` and cut or padded back to the same size."""
    size = images.shape[1]
    out = []
    for image in images:
        scaled = ndimage.zoom(image.astype(np.float32), factor, order=1)
        n = scaled.shape[0]
        if n >= size:
            o = (n - size) // 2
            scaled = scaled[o : o + size, o : o + size]
        else:
            p = size - n
            scaled = np.pad(scaled, ((p // 2, p - p // 2), (p // 2, p - p // 2)))
        out.append(scaled)
    return _uint8(np.stack(out))


def gamma(images: np.ndarray, g: float) -> np.ndarray:
    """Another intensity curve: x -> x ** g on [0, 1]."""
    return _uint8(255.0 * (images / 255.0) ** g)


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Moved by (dy, dx) pixels, the uncovered border black."""
    return _uint8(np.stack([ndimage.shift(i.astype(np.float32), (dy, dx), order=0, cval=0.0) for i in images]))


def noise(images: np.ndarray, sd: float, seed: int = 1) -> np.ndarray:
    """Gaussian pixel noise of ``sd`` grey levels."""
    return _uint8(images + np.random.default_rng(seed).normal(0, sd, images.shape))


#: One light disguise of each kind ("a few degrees", "a few percent"), and every
#: combination of two (rotation with zoom in both orders: two resamplings in a row leave a
#: residue of their own, which the detector must imitate).
SINGLE: dict[str, Disguise] = {
    "mirror": mirror,
    "rotate 6°": lambda x: rotate(x, 6),
    "rotate -10°": lambda x: rotate(x, -10),
    "zoom 0.93": lambda x: zoom(x, 0.93),
    "zoom 1.07": lambda x: zoom(x, 1.07),
    "gamma 0.7": lambda x: gamma(x, 0.7),
    "gamma 1.4": lambda x: gamma(x, 1.4),
}
PAIRS: dict[str, Disguise] = {
    "mirror + rotate 6°": lambda x: rotate(mirror(x), 6),
    "mirror + zoom 1.07": lambda x: zoom(mirror(x), 1.07),
    "mirror + gamma 0.7": lambda x: gamma(mirror(x), 0.7),
    "rotate -8° + zoom 0.93": lambda x: zoom(rotate(x, -8), 0.93),
    "zoom 0.93 + rotate 8°": lambda x: rotate(zoom(x, 0.93), 8),
    "rotate 8° + gamma 1.4": lambda x: gamma(rotate(x, 8), 1.4),
    "zoom 1.07 + gamma 0.7": lambda x: gamma(zoom(x, 1.07), 0.7),
}
#: What the pixel-aligned search caught before and must still catch.
PLAIN: dict[str, Disguise] = {
    "exact": lambda x: x.copy(),
    "noise sd 8": lambda x: noise(x, 8),
    "shift 1 px": lambda x: shift(x, 1, 0),
}


def mixed(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Each image under one disguise drawn at random from :data:`SINGLE` and :data:`PAIRS`."""
    rng = np.random.default_rng(seed)
    kinds = {**SINGLE, **PAIRS}
    names = list(kinds)
    chosen = [names[i] for i in rng.integers(0, len(names), len(images))]
    out = np.stack([kinds[name](image[None])[0] for name, image in zip(chosen, images, strict=True)])
    return out, chosen
