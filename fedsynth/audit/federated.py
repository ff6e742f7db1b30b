"""The federated audit: what a hospital sends the coordinator, and how the coordinator
combines it.

Each hospital audits the global generator against its own slices, where they are, and
keeps the full audit (distances, nearest-neighbour galleries, random real grids) in its
local report. It sends only the *share*: counts, verdicts and scalar figures, histograms
of distances on fixed bins, and ROC curves sampled on a fixed false-positive grid.

:data:`WIRE_SCHEMA` is that contract, key by key. :func:`validate_share` enforces it on
both sides: a hospital refuses to write a share that strays from it, and the coordinator
refuses to combine one (an unknown key, a list of the wrong length or any nested list,
which is how an image would travel, is rejected with the hospital and key named).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.audit.verdicts import AMBER, GREEN, RED, worst

__all__ = [
    "CONSORTIUM_FORMAT",
    "DCR_BIN_EDGES",
    "ROC_FPR_GRID",
    "SHARE_FILE",
    "SHARE_FORMAT",
    "ShareError",
    "WIRE_SCHEMA",
    "build_share",
    "combine_shares",
    "load_share",
    "validate_share",
]

SHARE_FILE = "share.json"
SHARE_FORMAT = "fedsynth-audit-share/2"  # 2: the copy detector's coverage
CONSORTIUM_FORMAT = "fedsynth-consortium-audit/1"
# Distances are sent relative to the hospital's own median holdout->train distance (each
# hospital fits its own feature spaces, so raw distances are not comparable across sites).
DCR_BIN_EDGES = np.round(np.linspace(0.0, 3.0, 61), 6)
# ROC curves travel as TPR at these false-positive rates, not as per-patient scores.
ROC_FPR_GRID = np.round(np.concatenate([[0.0], np.logspace(-3, 0, 31)]), 6)
MAX_TEXT = 600  # characters of one text field
MAX_ROWS = 64  # rows of a list, or entries of an object keyed by check, space or attack


class ShareError(ValueError):
    """A share that does not follow the wire contract."""


# --- the contract ---------------------------------------------------------------------------------


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verdict(value: Any) -> bool:
    return value in (GREEN, AMBER, RED)


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _optional_text(value: Any) -> bool:
    return value is None or _text(value)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _counts_on_bins(value: Any) -> bool:
    return isinstance(value, list) and len(value) == len(DCR_BIN_EDGES) and all(_count(v) for v in value)


def _tpr_on_grid(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == len(ROC_FPR_GRID)
        and all(isinstance(v, int | float) and 0 <= v <= 1 for v in value)
    )


def _names(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_text(v) for v in value)


ANY = "*"  # any key (a check, a feature space, an attack)
Leaf = Callable[[Any], bool]
_FIGURE_ROW = {
    "figure": _text,
    "space": _optional_text,
    "value": _number,
    "reference": _number,
    "verdict": _verdict,
    "meaning": _text,
    "threshold": _text,
}
_LEDGER_ROW = {
    "round": _count,
    "epsilon_rdp": _number,
    "epsilon_prv": _number,
    "delta": _number,
    "noise_multiplier": _number,
    "max_grad_norm": _number,
    "sample_rate": _number,
    "steps": _number,
    "units": _number,
    "privacy_unit": _optional_text,
    "target_epsilon": _number,
}

#: Everything a hospital may send the coordinator. Leaves are checks on a value; a list
#: of one dict is a list of rows of that shape. Nothing else crosses the wire.
WIRE_SCHEMA: dict[str, Any] = {
    "format": _text,
    "hospital": _text,
    "counts": {
        "train_images": _count,
        "train_patients": _count,
        "holdout_images": _count,
        "holdout_patients": _count,
        "synthetic_images": _count,
    },
    "privacy_unit": _text,
    "image_size": _count,
    "class_names": _names,
    "summary": {ANY: _verdict},
    "checks": {ANY: {"verdict": _verdict, "note": _optional_text, "figures": [_FIGURE_ROW]}},
    # per feature space: counts of distance / scale on DCR_BIN_EDGES (last bin: beyond 3x)
    "dcr_histograms": {
        ANY: {
            "synthetic_to_train": _counts_on_bins,
            "synthetic_to_holdout": _counts_on_bins,
            "holdout_to_train": _counts_on_bins,
        }
    },
    "membership": {
        ANY: {
            "auc": _real,
            "auc_p_value": _real,
            "tpr_at_1pct_fpr": _real,
            "members": _count,
            "non_members": _count,
            "epsilon_lower_bound": _real,
            "tpr_on_fpr_grid": _tpr_on_grid,
        }
    },
    "privacy": {"dp_sgd": _flag, "ledger": [_LEDGER_ROW]},
    # what the copy detector undoes before it measures a distance, and what it does not
    "copy_detector": {"covers": _names, "does_not_cover": _names},
    # the generator audited: its checkpoint's hash (--run) or the synthetic file's (--synthetic)
    "provenance": {"round": _number, "generator_sha256": _text, "audit_sha256": _text},
}


def validate_share(share: Any, source: str = "share") -> None:
    """Check a share against :data:`WIRE_SCHEMA`.

    Raises
    ------
    ShareError
        Naming the source and the first key that breaks the contract.
    """
    if not isinstance(share, dict):
        raise ShareError(f"{source}: not a JSON object")
    if share.get("format") != SHARE_FORMAT:  # first: an older share lacks newer keys
        raise ShareError(f"{source}: format {share.get('format')!r}, expected {SHARE_FORMAT!r}")
    missing = [key for key in WIRE_SCHEMA if key not in share]
    if missing:
        raise ShareError(f"{source}: missing {', '.join(missing)}")
    _check(share, WIRE_SCHEMA, source, "")


def _check(value: Any, spec: Any, source: str, path: str) -> None:
    where = path or "(top level)"
    if callable(spec):
        if not spec(value):
            raise ShareError(f"{source}: {where} = {_clip(value)} is not what the audit share may carry")
    elif isinstance(spec, list):
        if not isinstance(value, list) or len(value) > MAX_ROWS:
            raise ShareError(f"{source}: {where} must be a list of at most {MAX_ROWS} rows")
        for i, row in enumerate(value):
            _check(row, spec[0], source, f"{path}[{i}]")
    else:
        if not isinstance(value, dict):
            raise ShareError(f"{source}: {where} must be an object")
        missing = [key for key in spec if key != ANY and key not in value]
        if missing:
            raise ShareError(f"{source}: {where} lacks {', '.join(missing)}")
        if ANY in spec and len(value) > MAX_ROWS:
            raise ShareError(f"{source}: {where} has {len(value)} entries (at most {MAX_ROWS})")
        for key, item in value.items():
            if key in spec:
                _check(item, spec[key], source, f"{path}/{key}".lstrip("/"))
            elif ANY in spec and _text(key):
                _check(item, spec[ANY], source, f"{path}/{key}".lstrip("/"))
            else:
                raise ShareError(
                    f"{source}: {path + '/' if path else ''}{key} is not part of the audit share"
                )


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the hospital's side --------------------------------------------------------------------------


def build_share(
    hospital: str | None, audit: Mapping[str, Any], distances: Mapping[str, Any], audit_sha256: str
) -> dict[str, Any]:
    """The aggregate statistics of one hospital's audit (as read from audit.json: plain
    JSON values), and nothing else.

    ``distances`` maps a feature space to its :class:`~fedsynth.audit.memorization.Distances`;
    only histograms of them leave (distances divided by the median holdout->train
    distance, which itself is not sent). ``hospital`` None (an audit not named for one
    hospital) is sent as "site" with the whole ledger given to the audit.
    ``audit_sha256`` is the SHA-256 of the audit.json file written beside the share.
    """
    inputs = audit["inputs"]
    histograms = {}
    for space, d in distances.items():
        scale = float(np.median(d.holdout_to_train)) or 1.0
        histograms[space] = {
            name: _histogram(getattr(d, name) / scale)
            for name in ("synthetic_to_train", "synthetic_to_holdout", "holdout_to_train")
        }
    membership = {}
    for name, attack in audit["membership_inference"]["attacks"].items():
        fpr, tpr = np.asarray(attack["roc"]["fpr"]), np.asarray(attack["roc"]["tpr"])
        membership[name] = {
            key: attack[key]
            for key in (
                "auc",
                "auc_p_value",
                "tpr_at_1pct_fpr",
                "members",
                "non_members",
                "epsilon_lower_bound",
            )
        }
        membership[name]["tpr_on_fpr_grid"] = np.interp(ROC_FPR_GRID, fpr, tpr).round(5).tolist()
    checks = {
        name: {
            "verdict": check["verdict"],
            "note": check.get("note"),
            "figures": [{key: row.get(key) for key in _FIGURE_ROW} for row in check["figures"]],
        }
        for name, check in audit["checks"].items()
    }
    share = {
        "format": SHARE_FORMAT,
        "hospital": hospital or "site",
        "counts": {key: int(inputs[key]) for key in WIRE_SCHEMA["counts"]},
        "privacy_unit": inputs["privacy_unit"],
        "image_size": int(inputs["image_size"]),
        "class_names": list(inputs["class_names"]),
        "summary": dict(audit["summary"]),
        "checks": checks,
        "dcr_histograms": histograms,
        "membership": membership,
        "copy_detector": {
            key: list(audit["feature_spaces"]["pixels"].get(key, [])) for key in ("covers", "does_not_cover")
        },
        "privacy": {
            "dp_sgd": bool(audit["privacy"]["dp_sgd"]),
            "ledger": [
                {key: row.get(key) for key in _LEDGER_ROW}
                for row in audit["privacy"].get("ledger", [])
                if hospital is None or row.get("hospital") == hospital
            ],
        },
        "provenance": {
            "round": inputs.get("round"),
            "generator_sha256": inputs.get("checkpoint_sha256")
            or inputs.get("synthetic_sha256")
            or "unknown",
            "audit_sha256": audit_sha256,
        },
    }
    share = json.loads(json.dumps(share))  # exactly what a reader of the file gets
    validate_share(share, f"share of {hospital}")
    return share


def _histogram(values: np.ndarray) -> list[int]:
    """Counts on DCR_BIN_EDGES' bins, plus a last bin for everything beyond the last edge."""
    counts, _ = np.histogram(np.clip(values, 0, None), bins=DCR_BIN_EDGES)
    beyond = int((values >= DCR_BIN_EDGES[-1]).sum())
    counts[-1] -= int((values == DCR_BIN_EDGES[-1]).sum())  # np.histogram's last bin is closed
    return [int(c) for c in counts] + [beyond]


def load_share(path: str | Path) -> dict[str, Any]:
    """Read and validate a share file.

    Raises
    ------
    ShareError
        Not JSON, or not following the contract (the file and key named).
    """
    path = Path(path)
    try:
        share = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ShareError(f"{path}: not a readable audit share ({err})") from None
    validate_share(share, str(path))
    return share


# --- the coordinator's side -----------------------------------------------------------------------


def combine_shares(shares: list[dict[str, Any]]) -> dict[str, Any]:
    """The consortium's view: every hospital's verdicts and figures side by side, the
    worst light per check, pooled counts and pooled distance histograms.

    Raises
    ------
    ShareError
        A share breaks the contract, two shares name the same hospital, or the shares
        audit different generators.
    """
    if not shares:
        raise ShareError("no hospital shares to combine")
    for share in shares:
        validate_share(share, f"share of {share.get('hospital', '?') if isinstance(share, dict) else '?'}")
    names = [s["hospital"] for s in shares]
    if len(set(names)) != len(names):
        raise ShareError(f"two shares name the same hospital: {sorted(names)}")
    generators = {s["provenance"]["generator_sha256"] for s in shares}
    if len(generators) > 1:
        raise ShareError(
            "the shares audit different generators (checkpoint hashes differ): "
            + ", ".join(f"{s['hospital']}: {s['provenance']['generator_sha256'][:12]}" for s in shares)
        )
    checks = sorted({name for s in shares for name in s["checks"]}, key=_check_order)
    summary = {
        name: worst([s["checks"][name]["verdict"] for s in shares if name in s["checks"]]) for name in checks
    }
    pooled_hist: dict[str, dict[str, list[int]]] = {}
    for space in sorted({sp for s in shares for sp in s["dcr_histograms"]}):
        pooled_hist[space] = {
            name: np.sum(
                [s["dcr_histograms"][space][name] for s in shares if space in s["dcr_histograms"]], axis=0
            )
            .astype(int)
            .tolist()
            for name in ("synthetic_to_train", "synthetic_to_holdout", "holdout_to_train")
        }
    near = {}
    for space in pooled_hist:
        rows = [
            (s["counts"]["synthetic_images"], _figure_value(s, "copying", "near_copy_share", space))
            for s in shares
        ]
        count = sum(round(n * v) for n, v in rows if v is not None)
        total = sum(n for n, v in rows if v is not None)
        near[space] = {"count": count, "synthetic_images": total, "share": count / total if total else None}
    return {
        "format": CONSORTIUM_FORMAT,
        "hospitals": names,
        "summary": summary,
        "by_hospital": {s["hospital"]: s for s in shares},
        "totals": {key: sum(s["counts"][key] for s in shares) for key in WIRE_SCHEMA["counts"]},
        "pooled_dcr_histograms": pooled_hist,
        "pooled_near_copies": near,
        "copy_detector": _copy_detector(shares),
        "dcr_bin_edges": DCR_BIN_EDGES.tolist(),
        "roc_fpr_grid": ROC_FPR_GRID.tolist(),
        "generator": {
            "sha256": next(iter(generators)),
            "rounds": sorted({s["provenance"]["round"] for s in shares}, key=lambda r: (r is None, r)),
        },
    }


def _copy_detector(shares: list[dict[str, Any]]) -> dict[str, list[str]]:
    """What every hospital's copy detector undoes (the disguises all of them cover), and
    what any of them does not."""
    covers = [
        c
        for c in shares[0]["copy_detector"]["covers"]
        if all(c in s["copy_detector"]["covers"] for s in shares)
    ]
    missed = list(dict.fromkeys(m for s in shares for m in s["copy_detector"]["does_not_cover"]))
    return {"covers": covers, "does_not_cover": missed}


_CHECK_ORDER = ("formal_privacy", "copying", "membership_inference", "fidelity", "utility")


def _check_order(name: str) -> tuple[int, str]:
    return (_CHECK_ORDER.index(name) if name in _CHECK_ORDER else len(_CHECK_ORDER), name)


def _figure_value(share: Mapping[str, Any], check: str, figure: str, space: str) -> float | None:
    for row in share["checks"].get(check, {}).get("figures", []):
        if row["figure"] == figure and row["space"] == space:
            return row["value"]
    return None
