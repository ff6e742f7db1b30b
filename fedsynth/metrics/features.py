"""Feature spaces the audit measures in: pixels (PCA), an encoder trained on the real
data in the audit itself, the penultimate features of a classifier trained in the audit
on the real training split, and pytorch-fid's Inception-v3 when the user supplies its
weights.

Every metric needs a space where distances mean something. A randomly initialised
network is never used as a stand-in: its features are near-constant and every distance
comes out small (FID ~ 0). The encoder is trained here, on the hospital's real slices
(train and holdout alike, so members and non-members are embedded the same way); its
weights are hashed and its training loss is recorded as evidence that it learned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.progress import Progress
from fedsynth.metrics import classifier as clf

__all__ = [
    "INCEPTION_FILE",
    "AutoencoderSpace",
    "ClassifierSpace",
    "FeatureError",
    "FeatureSpace",
    "InceptionSpace",
    "PixelSpace",
    "find_inception_weights",
]

log = logging.getLogger(__name__)

# The file name pytorch-fid's loader looks for in the torch hub cache.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FeatureError(ValueError):
    """A feature space that cannot be built; the message names the file or the reason."""


class FeatureSpace(Protocol):
    name: str

    def transform(self, images: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) to float32 (N, H*W) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _array_hash(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class PixelSpace:
    """Pixels in [0, 1], projected onto their first principal components (fit on real data).

    Distances approximate pixel-wise Euclidean distances while keeping the search fast;
    the projection also averages out pixel noise, so a lightly noised copy stays close
    to its original.
    """

    components: int = 64
    seed: int = 0
    name: str = "pixels"
    _pca: Any = field(default=None, repr=False)  # a fitted sklearn PCA

    def fit(self, images: np.ndarray) -> PixelSpace:
        from sklearn.decomposition import PCA  # imported when first used (a round's validation score)

        n = min(self.components, len(images), images.shape[1] * images.shape[2])
        self._pca = PCA(n_components=n, svd_solver="randomized", random_state=self.seed).fit(_unit(images))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        if self._pca is None:
            raise FeatureError("pixel space used before fit()")
        # the projection in float32 and in chunks (sklearn's transform works in float64 on
        # the whole array: 1.6 GB and several seconds for 50,000 images)
        mean = self._pca.mean_.astype(np.float32)
        basis = self._pca.components_.astype(np.float32).T
        out = np.empty((len(images), basis.shape[1]), dtype=np.float32)
        for start in range(0, len(images), 8192):
            out[start : start + 8192] = (_unit(images[start : start + 8192]) - mean) @ basis
        return out

    def describe(self) -> dict[str, Any]:
        assert self._pca is not None
        return {
            "name": self.name,
            "kind": "pixels, PCA",
            "dimensions": int(self._pca.n_components_),
            "explained_variance": float(self._pca.explained_variance_ratio_.sum()),
            "fit_on": "real train and holdout slices",
            "sha256": _array_hash([self._pca.components_, self._pca.mean_]),
        }


class _Autoencoder(nn.Module):
    """Strided-convolution encoder of a 32x32 thumbnail to a ``dim``-vector, and its mirror
    decoder; small enough to train in well under a minute on two CPU cores."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        steps = 3  # 32 -> 4
        chans = [1] + [min(width * 2**i, 4 * width) for i in range(steps)]
        enc: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(chans[-1] * 16, dim))
        self.base = chans[-1]
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for cin, cout in zip(rev[:-1], rev[1:], strict=True):
            dec += [nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
            dec += [nn.Tanh()] if cout == 1 else [nn.BatchNorm2d(cout), nn.ReLU()]
        self.project = nn.Linear(dim, chans[-1] * 16)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(self.project(z).view(-1, self.base, 4, 4))


def _thumbnails(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S) to float (N, 1, 32, 32) in [-1, 1], area-averaged."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return F.adaptive_avg_pool2d(x, 32) if x.shape[-1] != 32 else x


@dataclass
class AutoencoderSpace:
    """A convolutional autoencoder trained on the audit's real slices; features are its
    bottleneck. Deterministic for a seed on CPU."""

    dim: int = 128
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    threads: int | None = None
    name: str = "encoder"
    _model: _Autoencoder | None = field(default=None, repr=False)
    _record: dict[str, Any] = field(default_factory=dict, repr=False)

    def fit(self, images: np.ndarray, progress: Progress | None = None) -> AutoencoderSpace:
        """Train on ``images`` (uint8, (N, S, S)) for ``steps`` minibatches.

        Raises
        ------
        FeatureError
            Too few images, or the loss did not fall (the encoder learned nothing).
        """
        if len(images) < 16:
            raise FeatureError(f"encoder: {len(images)} real images are too few to train on (need 16)")
        previous_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            torch.manual_seed(self.seed)
            rng = np.random.default_rng(self.seed)
            model = _Autoencoder(self.dim)
            data = _thumbnails(images)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
            losses: list[float] = []
            start = time.monotonic()
            model.train()
            for step in range(self.steps):
                batch = data[rng.integers(0, len(data), self.batch_size)]
                _, recon = model(batch)
                loss = F.mse_loss(recon, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if progress and (step + 1) % 25 == 0:
                    progress(step + 1, self.steps)
            model.eval()
        finally:
            torch.set_num_threads(previous_threads)
        head = float(np.mean(losses[: max(1, len(losses) // 20)]))
        tail = float(np.mean(losses[-max(1, len(losses) // 20) :]))
        baseline = float(data.var())  # MSE of predicting the mean image intensity
        if not tail < 0.5 * baseline:
            raise FeatureError(
                f"encoder: reconstruction error {tail:.4f} is not below half the data variance "
                f"{baseline:.4f} after {self.steps} steps; it learned too little to measure with"
            )
        self._model = model
        self._record = {
            "loss_first": head,
            "loss_last": tail,
            "data_variance": baseline,
            "loss_curve": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
            "seconds": time.monotonic() - start,
            "trained_on": int(len(images)),
        }
        return self

    @torch.no_grad()
    def transform(self, images: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise FeatureError("encoder used before fit()")
        out = []
        for start in range(0, len(images), 512):
            batch = _thumbnails(images[start : start + 512])
            out.append(self._model.encoder(batch).numpy())
        return np.concatenate(out).astype(np.float32)

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """32x32 reconstructions (uint8), to show what the encoder keeps."""
        assert self._model is not None
        x = _thumbnails(images)
        _, recon = self._model(x)
        return ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()

    def describe(self) -> dict[str, Any]:
        assert self._model is not None
        tensors = [p.detach().numpy() for p in self._model.state_dict().values()]
        return {
            "name": self.name,
            "kind": "convolutional autoencoder bottleneck (32x32 thumbnails), trained in this audit",
            "dimensions": self.dim,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "fit_on": "real train and holdout slices",
            "sha256": _array_hash(tensors),
            **{k: v for k, v in self._record.items()},
        }


@dataclass
class ClassifierSpace:
    """The penultimate features of the audit's small CNN (:class:`~fedsynth.metrics.classifier.SmallCNN`)
    trained to tell the classes apart on the real TRAINING slices only.

    This is the space the field measures in when no ImageNet weights exist: features that
    carry what distinguishes the classes (lesion, anatomy), trained on data the synthetic
    images are compared against, so distances follow what a reader looks at far better
    than pixels. The classifier never sees the holdout; its balanced accuracy there is
    recorded as evidence that it learned.
    """

    steps: int = 480
    batch_size: int = 64
    seed: int = 0
    threads: int | None = None
    name: str = "classifier"
    _model: nn.Module | None = field(default=None, repr=False)
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False)
    _record: dict[str, Any] = field(default_factory=dict, repr=False)

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        *,
        check: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ClassifierSpace:
        """Train on ``images`` (uint8, (N, S, S)) and their class indices for ``steps`` steps.
        ``check`` (images, labels), never trained on, gives the recorded balanced accuracy.

        Raises
        ------
        FeatureError
            Fewer than two classes or too few images to train on.
        """
        labels = np.asarray(labels, dtype=np.int64)
        present = np.unique(labels)
        if len(present) < 2:
            raise FeatureError("classifier: the real training slices hold a single class; nothing to learn")
        if len(images) < 16:
            raise FeatureError(f"classifier: {len(images)} real images are too few to train on (need 16)")
        previous_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        start = time.monotonic()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            seq = np.random.SeedSequence([self.seed, 0xC1A5])
            init_seed, order_seed = (int(v) for v in seq.generate_state(2))
            model, loss, _ = clf.train_classifier(
                torch.from_numpy(np.ascontiguousarray(images))[:, None].to(device),
                torch.from_numpy(labels).to(device),
                model="cnn",
                n_classes=n_classes,
                steps=self.steps,
                batch_size=self.batch_size,
                init_seed=init_seed,
                order_seed=order_seed,
                device=device,
            )
            record: dict[str, Any] = {"train_loss_last": float(loss), "trained_on": int(len(images))}
            if check is not None and len(check[0]):
                held = torch.from_numpy(np.ascontiguousarray(check[0]))[:, None]
                probs = clf.predict_proba(model, held, device)
                truth = np.asarray(check[1], dtype=np.int64)
                recall = [float((probs[truth == k].argmax(1) == k).mean()) for k in np.unique(truth)]
                record["holdout_balanced_accuracy"] = float(np.mean(recall))
        finally:
            torch.set_num_threads(previous_threads)
        record["seconds"] = time.monotonic() - start
        self._model, self._device, self._record = model, device, record
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise FeatureError("classifier space used before fit()")
        x = torch.from_numpy(np.ascontiguousarray(images))[:, None]
        return clf.features(self._model, x, self._device).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        assert self._model is not None
        tensors = [p.detach().cpu().numpy() for p in self._model.state_dict().values()]
        return {
            "name": self.name,
            "kind": "penultimate features of a small CNN classifier trained in this audit",
            "dimensions": [m for m in self._model.modules() if isinstance(m, nn.Linear)][-1].in_features,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "fit_on": "real train slices and their classes (never the holdout)",
            "sha256": _array_hash(tensors),
            **self._record,
        }


def find_inception_weights(explicit: str | Path | None) -> tuple[Path | None, str]:
    """Where pytorch-fid's Inception weights are: the given file, else the torch hub cache.

    Returns
    -------
    (path or None, a sentence saying where it was found or why FID cannot be computed)

    Raises
    ------
    FeatureError
        An explicit path that does not exist.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FeatureError(f"--inception-weights {path}: no such file")
        return path, f"Inception weights from {path}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached, f"Inception weights from the torch hub cache ({cached})"
    return None, (
        "FID was not computed: no Inception-v3 weights were supplied and this machine may not download "
        f"them. Give --inception-weights FILE ({INCEPTION_FILE} from the pytorch-fid release) or place it in "
        f"{cached.parent}."
    )


class InceptionSpace:
    """pytorch-fid's Inception-v3 pool features (2048-d), from a weights file the user supplies."""

    name = "inception"

    def __init__(self, weights: str | Path, *, batch_size: int = 32, device: str = "cpu") -> None:
        from pytorch_fid.inception import InceptionV3

        weights = Path(weights)
        self.weights = weights
        self.sha256 = file_sha256(weights)
        self.batch_size = batch_size
        self.device = device
        # pytorch-fid only loads its weights through torch.hub's cache; point a private
        # cache at the user's file so nothing is ever downloaded.
        with tempfile.TemporaryDirectory(prefix="fedsynth-hub-") as hub:
            (Path(hub) / "checkpoints").mkdir()
            target = Path(hub) / "checkpoints" / INCEPTION_FILE
            try:
                os.symlink(weights.resolve(), target)
            except OSError:
                shutil.copyfile(weights, target)
            previous = torch.hub.get_dir()
            torch.hub.set_dir(hub)
            try:
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)
            except Exception as err:  # a wrong or truncated file: torch raises several types
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise FeatureError(
                    f"{weights}: not pytorch-fid Inception-v3 weights ({first[:200]})"
                ) from None
            finally:
                torch.hub.set_dir(previous)
        self.model.eval().to(device)

    @torch.no_grad()
    def transform(self, images: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start : start + self.batch_size].astype(np.float32) / 255.0)
            batch = batch[:, None].expand(-1, 3, -1, -1).to(self.device)  # grey to RGB, [0, 1]
            out.append(self.model(batch)[0].squeeze(-1).squeeze(-1).cpu().numpy())
            if progress:
                progress(min(start + self.batch_size, len(images)), len(images))
        return np.concatenate(out).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "pytorch-fid Inception-v3 pool3",
            "dimensions": 2048,
            "weights": str(self.weights),
            "sha256": self.sha256,
        }
