"""The audit, end to end: feature spaces, fidelity, utility, memorization, membership
inference and the privacy ledger, judged against fresh real data, written to a folder.

Inputs are arrays (the CLI gathers them from a run and a slice set), so the calibration
tests can hand in copies of the training images, or the holdout, as "synthetic".
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.audit import membership, memorization
from fedsynth.audit.federated import SHARE_FILE, build_share
from fedsynth.audit.plots import plot_epsilon, plot_roc
from fedsynth.audit.utility import (
    BALANCED,
    CONTROL,
    DP_SGD,
    REAL,
    SYNTHETIC_ONLY,
    PrivateBaseline,
    plot_gain_vs_ratio,
    small_set,
    utility_study,
)
from fedsynth.audit.verdicts import AMBER, GREEN, RED, THRESHOLDS, judge, worst
from fedsynth.core.files import to_json, write_json_atomic, write_text_atomic
from fedsynth.core.grids import save_grid
from fedsynth.core.plotting import pyplot
from fedsynth.core.progress import Progress
from fedsynth.metrics import fidelity
from fedsynth.metrics.copies import CopyDetector, describe_pose
from fedsynth.metrics.features import (
    AutoencoderSpace,
    ClassifierSpace,
    FeatureError,
    InceptionSpace,
    find_inception_weights,
)

__all__ = [
    "AUDIT_FILE",
    "FIGURES",
    "AuditInputs",
    "AuditOptions",
    "Discriminator",
    "FittedSpaces",
    "fit_feature_spaces",
    "run_audit",
]

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
FIGURES = "figures"


@dataclass
class AuditInputs:
    """What the audit measures: the real split and the synthetic images.

    ``train_*`` are the images the generator was trained on (members), ``holdout_*`` the
    same hospitals' patients never trained on (fresh real data, the reference).
    ``synthetic_labels`` is None for an unconditional generator.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    train_patients: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    holdout_patients: np.ndarray
    synthetic_images: np.ndarray
    synthetic_labels: np.ndarray | None
    class_names: tuple[str, ...]
    privacy_unit: str = "slice"
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raises ValueError naming the set that is unusable."""
        for name in ("train", "holdout", "synthetic"):
            images = getattr(self, f"{name}_images")
            if images.ndim != 3 or images.dtype != np.uint8:
                raise ValueError(
                    f"{name} images: expected uint8 (N, H, W), got {images.dtype} {images.shape}"
                )
            if len(images) < 10:
                raise ValueError(f"{name} images: {len(images)} are too few to audit (need at least 10)")
        sizes = {self.train_images.shape[1:], self.holdout_images.shape[1:], self.synthetic_images.shape[1:]}
        if len(sizes) > 1:
            raise ValueError(f"image sizes differ between train, holdout and synthetic: {sorted(sizes)}")


@dataclass
class Discriminator:
    """A hospital's discriminator with the hospital's own members and non-members, for
    the white-box attack (available only where the hospital's state is)."""

    hospital: str
    model: torch.nn.Module
    records: membership.Records


@dataclass
class AuditOptions:
    seed: int = 0
    encoder_steps: int = 500
    inception_weights: str | None = None
    inception_max_images: int = 1000
    utility: bool = True
    utility_seeds: int = 5
    utility_steps: int | None = None
    utility_model: str = "cnn"
    # < 1: the utility study trains on this share of the training patients (a small
    # hospital) and the oracle adds real images of the other training patients
    utility_fraction: float = 1.0
    # where the run used DP-SGD, the utility study also trains a classifier by DP-SGD on the
    # real training slices at the epsilon the run spent: the private release to compare with
    dp_baseline: bool = True
    classifier_steps: int = 480
    mia_max_patients: int = 2000
    mia_max_slices: int = 8  # per patient
    # the closer-to-train share and authenticity use at most this many synthetic images
    share_sample: int = memorization.SAMPLE
    gallery_rows: int = 12
    threads: int | None = None


def run_audit(
    inputs: AuditInputs,
    out: str | Path,
    options: AuditOptions | None = None,
    *,
    privacy_ledger: list[dict[str, Any]] | None = None,
    client_privacy: list[dict[str, Any]] | None = None,
    discriminators: list[Discriminator] | None = None,
    progress: Progress | None = None,
    spaces_fitted: FittedSpaces | None = None,
    context: dict[str, Any] | None = None,
    hospital: str | None = None,
    paired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure everything, judge it, and write ``audit.json``, the figures and the
    share (``share.json``: the aggregate statistics a hospital may send the coordinator,
    see :mod:`fedsynth.audit.federated`) to ``out``.

    ``spaces_fitted`` reuses feature spaces from :func:`fit_feature_spaces` on the same
    real slices (several audits of one hospital's data need to train the encoder once).
    ``context`` (the run's configuration, versions, data description) is kept for the
    report; ``hospital`` names whose data this is, in the share. ``paired``: the
    mask-conditioned fidelity of a pix2pix generator (:mod:`fedsynth.audit.paired`),
    kept in audit.json and shown in the report.

    Returns
    -------
    The audit as written to audit.json.

    Raises
    ------
    ValueError
        Unusable inputs (named); FeatureError: Inception weights that do not load.
    """
    options = options or AuditOptions()
    inputs.validate()
    out = Path(out)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    timings: dict[str, float] = {}
    previous_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)

    def step(name: str, done: int = 0, total: int = 1) -> None:
        if progress:
            progress(done, total, name)

    try:
        t = time.monotonic()
        fitted = spaces_fitted or fit_feature_spaces(inputs, options, progress)
        encoder = fitted.encoder
        timings["feature_spaces"] = time.monotonic() - t
        detector = CopyDetector()
        spaces: dict[str, memorization.Search] = {
            # pixels, with the disguise undone: the copy detector
            "pixels": memorization.CopySearch(detector),
            "encoder": memorization.FeatureSearch(encoder.transform),
        }

        t = time.monotonic()
        distances = {}
        for name, search in spaces.items():
            step(f"memorization: nearest neighbours ({name})")
            distances[name] = memorization.measure_distances(
                name,
                search,
                synthetic=inputs.synthetic_images,
                train=inputs.train_images,
                holdout=inputs.holdout_images,
                seed=options.seed,
                train_patients=inputs.train_patients,
                holdout_patients=inputs.holdout_patients,
                sample=options.share_sample,
            )
        memo = {
            name: _memorization(d, _class_distances(inputs, d, spaces[name], options), inputs.class_names)
            for name, d in distances.items()
        }
        timings["memorization"] = time.monotonic() - t

        t = time.monotonic()
        step("fidelity")
        fid = _fidelity(inputs, distances, fitted, options, step)
        timings["fidelity"] = time.monotonic() - t

        t = time.monotonic()
        step("membership inference")
        mia = _membership(inputs, spaces, distances, options, discriminators or [])
        timings["membership"] = time.monotonic() - t

        dp = _privacy(privacy_ledger or [], client_privacy or [])
        dp["ledger_read"] = privacy_ledger is not None

        t = time.monotonic()
        util = _utility(
            inputs, options, out, step, epsilon=_spent(dp, hospital) if options.dp_baseline else None
        )
        timings["utility"] = time.monotonic() - t
        checks = _checks(memo, mia, fid, util, dp)
        figures = _figures(inputs, distances, mia, out, options)
        curves = (context or {}).get("curves")
        if curves and Path(curves).is_file():  # the run's training curves, shown in the report
            shutil.copyfile(curves, out / FIGURES / "training_curves.png")
            figures["training_curves"] = f"{FIGURES}/training_curves.png"
        if dp["ledger"]:
            figures["epsilon_rounds"] = str(
                plot_epsilon(dp["ledger"], out / FIGURES / "epsilon_rounds.png").relative_to(out)
            )
        if "conditions" in util:
            # No figure when every synthetic condition was skipped (too few synthetic
            # images): the skipped reasons are in audit.json and the report.
            if set(util["gains"]) - {CONTROL, DP_SGD}:
                figures["utility_gain"] = str(
                    plot_gain_vs_ratio(util, out / FIGURES / "utility_gain.png").relative_to(out)
                )
    finally:
        torch.set_num_threads(previous_threads)

    timings["total"] = time.monotonic() - started
    audit = {
        "format": "fedsynth-audit/1",
        "summary": {name: check["verdict"] for name, check in checks.items()},
        "checks": checks,
        "inputs": {
            "train_images": int(len(inputs.train_images)),
            "train_patients": int(len(np.unique(inputs.train_patients))),
            "holdout_images": int(len(inputs.holdout_images)),
            "holdout_patients": int(len(np.unique(inputs.holdout_patients))),
            "synthetic_images": int(len(inputs.synthetic_images)),
            "image_size": int(inputs.train_images.shape[1]),
            "class_names": list(inputs.class_names),
            "conditional": inputs.synthetic_labels is not None,
            "privacy_unit": inputs.privacy_unit,
            **inputs.provenance,
        },
        "feature_spaces": {
            "pixels": detector.describe(),
            "encoder": encoder.describe(),
            "classifier": fitted.classifier.describe()
            if fitted.classifier
            else {"computed": False, "reason": fitted.classifier_reason},
            "inception": fid.pop("inception_space"),
        },
        "fidelity": fid,
        **({"paired": paired} if paired else {}),
        "memorization": memo,
        "membership_inference": mia,
        "utility": util,
        "privacy": dp,
        "thresholds": THRESHOLDS,
        "figures": figures,
        "options": asdict(options),
        "context": context or {},
        "seconds": timings,
    }
    audit = to_json(audit)  # what a reader of audit.json gets (strict JSON: NaN is null)
    text = json.dumps(audit, indent=2, allow_nan=False)
    share = build_share(hospital, audit, distances, hashlib.sha256(text.encode()).hexdigest())
    write_text_atomic(out / AUDIT_FILE, text)
    write_json_atomic(out / SHARE_FILE, share)
    return audit


@dataclass
class FittedSpaces:
    """The feature spaces of one audit, fit on its real slices (reusable across audits of
    the same real data). ``classifier`` is None, with the reason, where the real training
    slices cannot train one (a single class)."""

    encoder: AutoencoderSpace
    classifier: ClassifierSpace | None
    classifier_reason: str = ""


def fit_feature_spaces(
    inputs: AuditInputs,
    options: AuditOptions,
    progress: Progress | None = None,
) -> FittedSpaces:
    """The audit's own encoder, fit on the real slices (train and holdout alike, so
    members and non-members are embedded the same way), and the classifier space,
    trained on the real TRAIN slices and their classes only (the holdout is what
    synthetic images are scored against in it)."""
    real = np.concatenate([inputs.train_images, inputs.holdout_images])
    label = "encoder: training on the real slices"
    encoder = AutoencoderSpace(steps=options.encoder_steps, seed=options.seed, threads=options.threads).fit(
        real, progress=(lambda d, n, stage="": progress(d, n, label)) if progress else None
    )
    if progress:
        progress(0, 1, "classifier: training on the real train slices")
    try:
        classifier: ClassifierSpace | None = ClassifierSpace(
            steps=options.classifier_steps, seed=options.seed, threads=options.threads
        ).fit(
            inputs.train_images,
            inputs.train_labels,
            len(inputs.class_names),
            check=(inputs.holdout_images, inputs.holdout_labels),
        )
        reason = ""
    except FeatureError as exc:
        classifier, reason = None, str(exc)
    return FittedSpaces(encoder, classifier, reason)


# --- measurements ---------------------------------------------------------------------------------


def _class_distances(
    inputs: AuditInputs, d: memorization.Distances, search: memorization.Search, options: AuditOptions
) -> dict[str, memorization.ShareDistances]:
    """Each class's synthetic images against that class's train and holdout slices, for the
    closer-to-train share (empty for an unconditional generator or a single class), on the
    images ``search`` indexed for the whole set ``d``. Over the whole set, a holdout whose
    class mix differs from train's tilts that share: the synthetic images of a class with
    few holdout patients find their nearest slice in train."""
    if inputs.synthetic_labels is None or len(inputs.class_names) < 2:
        return {}
    by_class: dict[str, memorization.ShareDistances] = {}
    for k, name in enumerate(inputs.class_names):
        s, t, h = inputs.synthetic_labels == k, inputs.train_labels == k, inputs.holdout_labels == k
        if s.sum() == 0 or t.sum() < 2 or h.sum() < 2:
            continue  # nothing to measure, or a class one side barely has
        by_class[name] = memorization.share_distances_within(
            d, search, synthetic=s, train=t, holdout=h, seed=options.seed, sample=options.share_sample
        )
    return by_class


def _memorization(
    d: memorization.Distances,
    by_class: dict[str, memorization.ShareDistances] | None = None,
    class_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The copying measures in one space. With ``by_class``, the closer-to-train share is
    measured within each class and pooled (the whole-set share kept beside it, and the
    classes too thin on one side to measure named)."""
    near = memorization.near_copies(d)
    share = memorization.closer_to_train_share(d)
    if by_class:
        share = memorization.closer_to_train_within_classes(by_class) | {
            "whole_set": share,
            "skipped_classes": [c for c in class_names if c not in by_class],
        }
    return {
        "dcr": memorization.dcr_summary(d),
        "closer_to_train": share,
        "c_t": memorization.data_copying_ct(d),
        "authenticity": memorization.authenticity_test(d),
        "near_copies": {k: v for k, v in near.items() if k != "indices"}
        | {"first_indices": near["indices"][:50]},
    }


def _fidelity(
    inputs: AuditInputs,
    distances: dict[str, memorization.Distances],
    fitted: FittedSpaces,
    options: AuditOptions,
    step: Callable[..., None],
) -> dict[str, Any]:
    rng = np.random.default_rng(options.seed)
    enc = distances["encoder"]
    n_ref = len(enc.holdout_features)
    # the same number of synthetic images as holdout images, so both Fréchet distances carry the same bias
    same_n = rng.choice(
        len(enc.synthetic_features), size=min(n_ref, len(enc.synthetic_features)), replace=False
    )
    result: dict[str, Any] = {
        "encoder": {
            "frechet_distance": {
                "synthetic": fidelity.frechet_distance(enc.train_features, enc.synthetic_features[same_n]),
                "holdout": fidelity.frechet_distance(enc.train_features, enc.holdout_features),
            },
            "kid": {
                "synthetic": fidelity.kernel_inception_distance(
                    enc.train_features, enc.synthetic_features, seed=options.seed
                ),
                "holdout": fidelity.kernel_inception_distance(
                    enc.train_features, enc.holdout_features, seed=options.seed
                ),
            },
            "prdc": {
                "synthetic": fidelity.precision_recall_density_coverage(
                    enc.train_features, enc.synthetic_features[same_n]
                ),
                "holdout": fidelity.precision_recall_density_coverage(
                    enc.train_features, enc.holdout_features
                ),
            },
        }
    }
    if fitted.classifier is not None:
        step("fidelity: classifier features")
        result["classifier"] = _classifier_fidelity(inputs, fitted.classifier, options)
    else:
        result["classifier"] = {"computed": False, "reason": fitted.classifier_reason}
    weights, how = find_inception_weights(options.inception_weights)
    if weights is None:
        result["inception_space"] = {"computed": False, "reason": how}
    else:
        step("fidelity: Inception-v3 features (slow on CPU)")
        space = InceptionSpace(weights, device="cuda" if torch.cuda.is_available() else "cpu")
        cap = options.inception_max_images

        def pick(images: np.ndarray) -> np.ndarray:
            return images[rng.choice(len(images), min(cap, len(images)), replace=False)]

        train_f, hold_f = (
            space.transform(pick(inputs.train_images)),
            space.transform(pick(inputs.holdout_images)),
        )
        syn_f = space.transform(pick(inputs.synthetic_images)[: len(hold_f)])
        result["inception"] = {
            "fid": {
                "synthetic": fidelity.frechet_distance(train_f, syn_f),
                "holdout": fidelity.frechet_distance(train_f, hold_f),
            },
            "images": {"train": len(train_f), "holdout": len(hold_f), "synthetic": len(syn_f)},
        }
        result["inception_space"] = {"computed": True, "reason": how, **space.describe()}
    labels_known = inputs.synthetic_labels is not None
    # a hospital may hold no training slice of a class the generator draws (a non-IID
    # consortium): those images have nothing of their class to be matched against
    held = np.unique(inputs.train_labels)

    def matched(images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        keep = (
            np.isin(labels, held) if labels_known and labels is not None else np.ones(len(images), dtype=bool)
        )
        if not keep.any():
            return {"computed": False, "reason": "no training slice of these images' classes"}
        summary = fidelity.class_matched_ssim_psnr(
            images[keep],
            labels[keep] if labels_known and labels is not None else None,
            inputs.train_images,
            inputs.train_labels if labels_known else None,
            seed=options.seed,
        )
        left_out = int((~keep).sum())
        return _drop_values(summary) | ({"left_out_no_training_slice_of_class": left_out} if left_out else {})

    result["ssim_psnr_class_matched"] = {
        "synthetic": matched(inputs.synthetic_images, inputs.synthetic_labels),
        "holdout": matched(inputs.holdout_images, inputs.holdout_labels),
        "protocol": "each image against one random training image of the same class (MedScanGAN, seed paper "
        "003)",
    }
    pix = distances["pixels"]

    def undone(images: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
        return images if theta is None else CopyDetector.align(images, theta)

    result["nearest_neighbour_ssim"] = {
        "synthetic": _drop_values(
            fidelity.nearest_neighbour_ssim(
                undone(inputs.synthetic_images, pix.synthetic_theta),
                inputs.train_images,
                pix.synthetic_to_train_index,
            )
        ),
        "holdout": _drop_values(
            fidelity.nearest_neighbour_ssim(
                undone(inputs.holdout_images, pix.holdout_theta),
                inputs.train_images,
                pix.holdout_to_train_index,
            )
        ),
        "note": "SSIM with the nearest training image, the copy detector's disguise undone: a privacy signal "
        "(copies score near 1), not a quality score",
    }
    result["ms_ssim_diversity"] = {
        "synthetic": fidelity.ms_ssim_diversity(inputs.synthetic_images, seed=options.seed),
        "real": fidelity.ms_ssim_diversity(
            np.concatenate([inputs.train_images, inputs.holdout_images]), seed=options.seed
        ),
        "note": "mean MS-SSIM between random pairs within a set: higher than the real value means less "
        "diverse",
    }
    result["intensity_histogram"] = {
        "synthetic": fidelity.intensity_histogram_distance(inputs.train_images, inputs.synthetic_images),
        "holdout": fidelity.intensity_histogram_distance(inputs.train_images, inputs.holdout_images),
    }
    return result


# fewest holdout images on each side of the split for a Fréchet distance in 128 dimensions
# to be worth reporting
_MIN_HALF = 20


def _classifier_fidelity(
    inputs: AuditInputs, space: ClassifierSpace, options: AuditOptions
) -> dict[str, Any]:
    """Fréchet distance, KID and precision / recall / density / coverage of the synthetic
    images in the classifier's features, scored against held-out real slices.

    The classifier trained on the training slices, so their features are not those of
    fresh data: the reference is half of the holdout patients, and "holdout" is the other
    half (fresh real slices scored the same way, with as many synthetic images)."""
    rng = np.random.default_rng([options.seed, 0xF1D])
    patients = np.unique(inputs.holdout_patients)
    if len(patients) >= 4:
        chosen = rng.permutation(patients)[: len(patients) // 2]
        in_reference = np.isin(inputs.holdout_patients, chosen)
        unit = "patients"
    else:
        in_reference = np.zeros(len(inputs.holdout_images), dtype=bool)
        in_reference[rng.permutation(len(in_reference))[: len(in_reference) // 2]] = True
        unit = "images"
    reference_f = space.transform(inputs.holdout_images[in_reference])
    fresh_f = space.transform(inputs.holdout_images[~in_reference])
    if min(len(reference_f), len(fresh_f)) < _MIN_HALF:
        return {
            "computed": False,
            "reason": f"the holdout's halves hold {len(reference_f)} and {len(fresh_f)} images; "
            f"{_MIN_HALF} each are needed",
        }
    synthetic_f = space.transform(inputs.synthetic_images)
    same_n = rng.choice(len(synthetic_f), size=min(len(fresh_f), len(synthetic_f)), replace=False)
    return {
        "computed": True,
        "reference": f"half of the holdout ({unit} drawn at random); 'holdout' is the other half",
        "images": {"reference": len(reference_f), "holdout": len(fresh_f), "synthetic": len(same_n)},
        "frechet_distance": {
            "synthetic": fidelity.frechet_distance(reference_f, synthetic_f[same_n]),
            "holdout": fidelity.frechet_distance(reference_f, fresh_f),
        },
        "kid": {
            "synthetic": fidelity.kernel_inception_distance(reference_f, synthetic_f, seed=options.seed),
            "holdout": fidelity.kernel_inception_distance(reference_f, fresh_f, seed=options.seed),
        },
        "prdc": {
            "synthetic": fidelity.precision_recall_density_coverage(reference_f, synthetic_f[same_n]),
            "holdout": fidelity.precision_recall_density_coverage(reference_f, fresh_f),
        },
    }


def _drop_values(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "values"}


def _membership(
    inputs: AuditInputs,
    spaces: dict[str, memorization.Search],
    distances: dict[str, memorization.Distances],
    options: AuditOptions,
    discriminators: list[Discriminator],
) -> dict[str, Any]:
    records = membership.select_records(
        inputs.train_images,
        inputs.train_labels,
        inputs.train_patients,
        inputs.holdout_images,
        inputs.holdout_labels,
        inputs.holdout_patients,
        max_patients=options.mia_max_patients,
        max_slices=options.mia_max_slices,
        seed=options.seed,
    )
    attacks: dict[str, Any] = {}
    for name, search in spaces.items():
        indexed = membership.IndexedRecords(search, records, distances[name].synthetic_index)
        attacks[f"distance/{name}"] = membership.attack_metrics(
            membership.distance_scores(indexed), records.member, seed=options.seed
        )
        attacks[f"density/{name}"] = membership.attack_metrics(
            membership.density_scores(indexed), records.member, seed=options.seed
        )
    for disc in discriminators:
        attacks[f"discriminator/{disc.hospital}"] = membership.attack_metrics(
            membership.discriminator_scores(disc.model, disc.records), disc.records.member, seed=options.seed
        )
    return {
        "attacks": attacks,
        "members": int(records.member.sum()),
        "non_members": int((~records.member).sum()),
        "unit": inputs.privacy_unit,
    }


def _spent(dp: dict[str, Any], hospital: str | None) -> tuple[float, float] | None:
    """(epsilon, delta) the run's DP-SGD spent: this hospital's where the ledger has it,
    else the largest of any hospital's; None for a run without DP-SGD."""
    rows = {name: row for name, row in dp["hospitals"].items() if row.get("epsilon_rdp")}
    if not rows:
        return None
    row = rows.get(hospital or "") or max(rows.values(), key=lambda r: r["epsilon_rdp"])
    return float(row["epsilon_rdp"]), float(row.get("delta") or 0.0)


def _utility(
    inputs: AuditInputs,
    options: AuditOptions,
    out: Path,
    step: Callable[..., None],
    *,
    epsilon: tuple[float, float] | None = None,
) -> dict[str, Any]:
    if not options.utility:
        return {"skipped": "not asked for (--no-utility)"}
    if inputs.synthetic_labels is None:
        return {
            "skipped": "the generator is unconditional: synthetic images carry no class label to train a "
            "classifier on"
        }
    if len(np.unique(inputs.holdout_labels)) < 2:
        return {"skipped": "the holdout holds a single class: a classifier cannot be tested on it"}
    train_images, train_labels, unseen = inputs.train_images, inputs.train_labels, None
    units = inputs.train_patients if inputs.privacy_unit == "patient" else np.arange(len(train_labels))
    if options.utility_fraction < 1:
        small = small_set(train_labels, inputs.train_patients, options.utility_fraction, seed=options.seed)
        unseen = (train_images[~small], train_labels[~small])
        train_images, train_labels, units = train_images[small], train_labels[small], units[small]
    private = None
    if epsilon is not None:
        private = PrivateBaseline(epsilon[0], units, unit=inputs.privacy_unit, delta=epsilon[1])
    result = utility_study(
        train_images,
        train_labels,
        inputs.holdout_images,
        inputs.holdout_labels,
        inputs.synthetic_images,
        inputs.synthetic_labels,
        class_names=inputs.class_names,
        holdout_groups=inputs.holdout_patients,
        unseen_images=None if unseen is None else unseen[0],
        unseen_labels=None if unseen is None else unseen[1],
        seeds=options.utility_seeds,
        steps=options.utility_steps,
        model=options.utility_model,
        seed=options.seed,
        threads=options.threads,
        progress=lambda d, n, stage="": step("utility: training classifiers", d, n),
        private=private,
    )
    result["fraction"] = float(options.utility_fraction)
    return result


_LEDGER_KEYS = (
    "epsilon_rdp",
    "epsilon_prv",
    "delta",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "units",
    "privacy_unit",
    "target_epsilon",
)


def _privacy(ledger: list[dict[str, Any]], client: list[dict[str, Any]]) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}
    for row in ledger:
        latest[row["hospital"]] = row
    hospitals = {
        name: {k: row.get(k) for k in ("round", *_LEDGER_KEYS)} for name, row in sorted(latest.items())
    }
    rows = [
        {k: row.get(k) for k in ("hospital", "round", *_LEDGER_KEYS)}
        for row in ledger
        if row.get("trained", True) and row.get("epsilon_rdp") is not None
    ]
    return {
        "dp_sgd": bool(hospitals),
        "hospitals": hospitals,
        "ledger": rows,
        "client_level": client[-1] if client else None,
    }


# --- judging --------------------------------------------------------------------------------------


def _figure(
    value: float | None,
    reference: float | None,
    figure: str,
    verdict: str,
    meaning: str,
    space: str | None = None,
) -> dict[str, Any]:
    row = {
        "value": value,
        "reference": reference,
        "threshold": THRESHOLDS[figure]["rule"],
        "verdict": verdict,
        "meaning": meaning,
        "figure": figure,
    }
    if space:
        row["space"] = space
    return row


def _checks(
    memo: dict[str, Any], mia: dict[str, Any], fid: dict[str, Any], util: dict[str, Any], dp: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    copying: list[dict[str, Any]] = []
    for space, m in memo.items():
        near = m["near_copies"]
        copying.append(
            _figure(
                near["share"],
                near["null_rate"],
                "near_copy_share",
                judge("near_copy_share", near["share"], significant=near["p_value"] < 0.01),
                f"{near['count']} synthetic images are nearer a training image than 99% of fresh patients' "
                "images are",
                space,
            )
        )
        ratio = m["dcr"]["median_ratio"]
        copying.append(
            _figure(
                ratio,
                1.0,
                "dcr_median_ratio",
                judge("dcr_median_ratio", ratio),
                "how far synthetic images sit from training images, relative to fresh real images",
                space,
            )
        )
        share = m["closer_to_train"]
        excess = share["copying_equivalent"]
        light = (
            RED
            if excess > THRESHOLDS["closer_to_train_excess"]["red"] and share["p_value"] < 1e-3
            else AMBER
            if excess > THRESHOLDS["closer_to_train_excess"]["amber"] and share["p_value"] < 1e-2
            else GREEN
        )
        copying.append(
            _figure(
                excess,
                0.0,
                "closer_to_train_excess",
                light,
                f"{share['share']:.1%} of synthetic images are closer to training patients than to as many "
                f"fresh patients{' of their class' if share.get('within_classes') else ''} (50% expected); "
                "the value is the excess as a share of what copying every training image would give",
                space,
            )
        )
        c_t = m["c_t"]["c_t"]
        copying.append(
            _figure(
                c_t,
                0.0,
                "c_t",
                judge("c_t", c_t),
                "data-copying test: strongly negative means synthetic images hug training images",
                space,
            )
        )
        auth = m["authenticity"]
        copying.append(
            _figure(
                auth["synthetic"],
                auth["holdout"],
                "authenticity_gap",
                judge("authenticity_gap", auth["gap"], significant=auth["p_value"] < 0.01),
                "share of synthetic images that are not closer to a training image than its own neighbours "
                "are",
                space,
            )
        )
    attacks: list[dict[str, Any]] = []
    for name, attack in mia["attacks"].items():
        # small sites: AUC and TPR swing widely by chance, so a light needs significance, and
        # TPR at 1% FPR is judged only with >= 100 non-members (1% of fewer is not one patient)
        significant = attack["auc_p_value"] < 0.01
        lights = [judge("mia_auc", attack["auc"], significant=significant)]
        if attack["non_members"] >= 100:
            lights.append(judge("mia_tpr_at_1pct_fpr", attack["tpr_at_1pct_fpr"], significant=significant))
        light = worst(lights)
        attacks.append(
            _figure(
                attack["auc"],
                0.5,
                "mia_auc",
                light,
                f"attack '{name}': AUC {attack['auc']:.2f}, {attack['tpr_at_1pct_fpr']:.1%} of training "
                f"{mia['unit']}s found at 1% false alarms",
                name.split("/")[1],
            )
        )
    # the headline space: the classifier's features where the real slices could train one
    # (they follow what a reader sees); the encoder's rows are shown beside them
    headline = "classifier" if fid.get("classifier", {}).get("computed") else "encoder"
    fidelity_rows: list[dict[str, Any]] = []
    for space in dict.fromkeys([headline, "encoder"]):
        f = fid[space]
        fd_ratio = _ratio(f["frechet_distance"]["synthetic"], f["frechet_distance"]["holdout"])
        cov = _ratio(f["prdc"]["synthetic"]["coverage"], f["prdc"]["holdout"]["coverage"])
        prec = _ratio(f["prdc"]["synthetic"]["precision"], f["prdc"]["holdout"]["precision"])
        fidelity_rows += [
            _figure(
                fd_ratio,
                1.0,
                "fd_ratio",
                judge("fd_ratio", fd_ratio),
                "how far the synthetic image distribution is from the real one, relative to fresh real data",
                space,
            ),
            _figure(
                cov,
                1.0,
                "coverage_ratio",
                judge("coverage_ratio", cov),
                "how much of the variety of real images the synthetic images cover",
                space,
            ),
            _figure(
                prec,
                1.0,
                "precision_ratio",
                judge("precision_ratio", prec),
                "how many synthetic images look like some real image",
                space,
            ),
        ]
    judged = [r["verdict"] for r in fidelity_rows if r["space"] == headline]
    conditions = util.get("conditions", {})
    if SYNTHETIC_ONLY in conditions and REAL in conditions:
        cas = conditions[SYNTHETIC_ONLY]["balanced_accuracy"]["mean"]
        real_ba = conditions[REAL]["balanced_accuracy"]["mean"]
        cas_ratio = _ratio(cas, real_ba)
        fidelity_rows.append(
            _figure(
                cas_ratio,
                1.0,
                "cas_ratio",
                judge("cas_ratio", cas_ratio),
                f"a classifier trained on synthetic images only scores {cas:.3f} balanced accuracy on the "
                f"holdout, one trained on as many real images {real_ba:.3f}: the synthetic images carry "
                "their classes",
            )
        )
        judged.append(fidelity_rows[-1]["verdict"])
    if "gains" in util and BALANCED in util["gains"]:
        gain = util["gains"][BALANCED]["over_control"]["balanced_accuracy"]
        light = GREEN if gain["ci_low"] > 0 else RED if gain["ci_high"] < 0 else AMBER
        utility_rows = [
            _figure(
                gain["mean"],
                0.0,
                "utility_gain",
                light,
                f"balanced accuracy changes by {gain['mean']:+.3f} (95% CI {gain['ci_low']:+.3f} to "
                f"{gain['ci_high']:+.3f}) when synthetic images are added, beyond what re-drawing real "
                "images gives",
            )
        ]
        utility_verdict = light
        oracle = util.get("oracle", {}).get("balanced_accuracy")
        if oracle:
            top, share = oracle["gain_over_control"], oracle["share_of_oracle"].get(BALANCED)
            utility_rows.append(
                _figure(
                    share,
                    1.0,
                    "oracle_share",
                    judge("oracle_share", share) if oracle["headroom"] else AMBER,
                    f"as many unseen REAL images gain {top['mean']:+.3f} (95% CI {top['ci_low']:+.3f} to "
                    f"{top['ci_high']:+.3f}) over the control: the synthetic images give "
                    + (f"{share:.0%} of that" if share is not None else "a share that is undefined")
                    + ("" if oracle["headroom"] else "; the oracle shows no headroom: that gain says little"),
                )
            )
    else:
        utility_rows = []
        utility_verdict = AMBER
    eps_rows = []
    for name, row in dp["hospitals"].items():
        eps = row.get("epsilon_rdp")
        delta = f" at δ = {row['delta']:.0e}" if row.get("delta") is not None else ""
        eps_rows.append(
            _figure(
                eps,
                None,
                "epsilon",
                judge("epsilon", eps),
                f"{name}: formal guarantee ε = {eps:.3g} per {row.get('privacy_unit') or 'slice'}{delta}"
                if eps is not None
                else f"{name}: ε unknown",
                name,
            )
        )
    dp_verdict = worst([r["verdict"] for r in eps_rows]) if eps_rows else RED
    dp_note = (
        None
        if eps_rows
        else (
            "the run did not use DP-SGD: there is no formal guarantee"
            if dp["ledger_read"]
            else "no privacy ledger was given (audit of --synthetic without --run): no formal guarantee is "
            "shown"
        )
    )
    return {
        "formal_privacy": {"verdict": dp_verdict, "figures": eps_rows, "note": dp_note},
        "copying": {
            "verdict": worst([r["verdict"] for r in copying]),
            "figures": copying,
            "note": _duplicate_warning(memo),
        },
        "membership_inference": {"verdict": worst([r["verdict"] for r in attacks]), "figures": attacks},
        "fidelity": {
            "verdict": worst(judged),
            "figures": fidelity_rows,
            "note": f"judged in the {headline} space"
            + ("" if headline == "classifier" else f" ({fid.get('classifier', {}).get('reason')})"),
        },
        "utility": {
            "verdict": utility_verdict,
            "figures": utility_rows,
            "note": util.get("skipped") if isinstance(util.get("skipped"), str) else None,
        },
    }


def _duplicate_warning(memo: dict[str, Any]) -> str | None:
    share = max(m["near_copies"]["holdout_exact_share"] for m in memo.values())
    if share == 0:
        return None
    return (
        f"{share:.1%} of holdout images are exact copies of training images: the real data holds duplicates "
        "across train and holdout, so the fresh-data reference is contaminated. De-duplicate the data "
        "(`fedsynth prepare` does) and audit again."
    )


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("inf") if a else 1.0


# --- figures --------------------------------------------------------------------------------------


def _figures(
    inputs: AuditInputs,
    distances: dict[str, memorization.Distances],
    mia: dict[str, Any],
    out: Path,
    options: AuditOptions,
) -> dict[str, str]:
    plt = pyplot()

    folder = out / FIGURES
    written: dict[str, str] = {}
    fig, axes = plt.subplots(1, len(distances), figsize=(6 * len(distances), 4))
    for ax, (space, d) in zip(np.atleast_1d(axes), distances.items(), strict=True):
        top = (
            max(
                float(np.quantile(x, 0.99))
                for x in (d.synthetic_to_train, d.synthetic_to_holdout, d.holdout_to_train)
            )
            or 1.0
        )
        bins = np.linspace(0, top, 50)
        ax.hist(d.synthetic_to_train, bins, alpha=0.5, density=True, label="synthetic → nearest train")
        ax.hist(d.synthetic_to_holdout, bins, alpha=0.5, density=True, label="synthetic → nearest holdout")
        ax.hist(
            d.holdout_to_train,
            bins,
            histtype="step",
            lw=2,
            color="k",
            density=True,
            label="holdout → nearest train (fresh real data)",
        )
        ax.axvline(
            float(np.percentile(d.holdout_to_train, 1, method="lower")),
            color="red",
            ls="--",
            label="near-copy threshold",
        )
        ax.set_title(f"distance to closest record ({space})")
        ax.set_xlabel("distance")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "dcr_histograms.png", dpi=110)
    plt.close(fig)
    written["dcr_histograms"] = f"{FIGURES}/dcr_histograms.png"

    plot_roc(
        {
            f"{name} (AUC {attack['auc']:.2f})": (attack["roc"]["fpr"], attack["roc"]["tpr"])
            for name, attack in mia["attacks"].items()
        },
        folder / "mia_roc.png",
    )
    written["mia_roc"] = f"{FIGURES}/mia_roc.png"

    pix = distances["pixels"]
    order = np.argsort(pix.synthetic_to_train, kind="stable")[: options.gallery_rows]
    tiles, names = [], []
    size = inputs.train_images.shape[1]
    # each shown synthetic image's nearest holdout image, found the same way
    search = memorization.CopySearch(CopyDetector())
    to_holdout, holdout_at = search.nearest(search.subset(pix.synthetic_index, order), pix.holdout_index)
    holdout_theta = search.last_theta
    for row, i in enumerate(order):
        theta = pix.synthetic_theta[i] if pix.synthetic_theta is not None else None
        undone = (
            CopyDetector.align(inputs.synthetic_images[i], theta)
            if theta is not None
            else inputs.synthetic_images[i]
        )
        holdout_undone = (
            CopyDetector.align(inputs.synthetic_images[i], holdout_theta[row])
            if holdout_theta is not None
            else inputs.synthetic_images[i]
        )
        tiles += [
            inputs.synthetic_images[i],
            undone,
            inputs.train_images[pix.synthetic_to_train_index[i]],
            holdout_undone,
            inputs.holdout_images[holdout_at[row]],
        ]
        pose = describe_pose(theta, size) if theta is not None else "same pose"
        names.append(f"{pose}; d {pix.synthetic_to_train[i]:.4f} vs {to_holdout[row]:.4f}")
    scale = max(2, 128 // inputs.train_images.shape[1])
    save_grid(
        np.stack(tiles),
        folder / "closest_pairs.png",
        columns=5,
        scale=scale,
        row_names=names,
        title="synthetic | its disguise undone | nearest train || undone for the holdout | nearest holdout "
        "(distances after matching the intensity curve)",
    )
    written["closest_pairs"] = f"{FIGURES}/closest_pairs.png"

    rng = np.random.default_rng(options.seed)
    n = min(32, len(inputs.synthetic_images), len(inputs.train_images))
    syn = inputs.synthetic_images[rng.choice(len(inputs.synthetic_images), n, replace=False)]
    real = inputs.train_images[rng.choice(len(inputs.train_images), n, replace=False)]
    save_grid(
        syn, folder / "synthetic_random.png", columns=8, scale=scale, title="synthetic, drawn at random"
    )
    save_grid(
        real,
        folder / "real_random.png",
        columns=8,
        scale=scale,
        title="real training images, drawn at random",
    )
    written["synthetic_random"] = f"{FIGURES}/synthetic_random.png"
    written["real_random"] = f"{FIGURES}/real_random.png"
    return written
