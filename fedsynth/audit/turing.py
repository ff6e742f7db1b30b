"""Visual Turing test: a blinded, shuffled sheet of real and synthetic slices for an expert,
its answer key kept apart, and the expert's answers scored against chance."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.audit.documents import array_data_uri, esc, write_html, write_pdf
from fedsynth.core.files import atomic_open, write_json_atomic

__all__ = [
    "ANSWERS_FILE",
    "KEY_FORMAT",
    "PDF_FILE",
    "REAL",
    "SHEET_FILE",
    "SYNTHETIC",
    "TuringError",
    "make_test",
    "read_answers",
    "read_key",
    "score",
]

SHEET_FILE, PDF_FILE, ANSWERS_FILE = "sheet.html", "sheet.pdf", "answers.csv"
REAL, SYNTHETIC = "real", "synthetic"
KEY_FORMAT = "fedsynth-turing-key-1"
ANSWER_COLUMNS = ("id", "answer", "confidence")
_ANSWER_WORDS = {"real": REAL, "r": REAL, "synthetic": SYNTHETIC, "s": SYNTHETIC}
_CONFIDENCE_LEVELS = ("1", "2", "3", "4", "5")
DISPLAY_PX = 160  # slices are enlarged (nearest neighbour) to about this many pixels


class TuringError(ValueError):
    """A Turing test that cannot be made or scored; the message says which file or id."""


# --- making the test ---------------------------------------------------------------------
def make_test(
    real_images: np.ndarray,
    real_labels: np.ndarray | None,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray | None,
    class_names: tuple[str, ...] | list[str],
    n: int,
    seed: int,
    out_dir: str | Path,
    key_path: str | Path,
    provenance: dict[str, Any],
    *,
    real_split: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a blinded test of ``n`` real and ``n`` synthetic slices, and its key.

    Real slices come from the holdout (patients never trained on) when ``real_split`` marks
    at least ``n`` of them, else from all real slices; the key says which. Both kinds are
    drawn without replacement, shuffled together with ``seed`` and numbered T001, T002, ...
    in the order the sheet shows them, so an id says nothing about its image.

    Writes ``out_dir/sheet.html`` (self-contained, printable), ``out_dir/sheet.pdf`` (the
    same page through WeasyPrint) and ``out_dir/answers.csv`` (``id,answer,confidence``
    with empty answers, for the expert), then the key as JSON to ``key_path``.

    Parameters
    ----------
    real_images, synthetic_images : (N, H, W) uint8 slices of the same size.
    real_labels, synthetic_labels : class indices into ``class_names``, or None where
        unknown (an unconditional generator); recorded in the key only.
    class_names : class names in label order.
    n : images of each kind.
    seed : seed of the draw and of the shuffle.
    out_dir : folder handed to the expert.
    key_path : where the key goes; must lie outside ``out_dir``.
    provenance : where the images came from (files, run, round, hashes), copied into the key.
    real_split : per real image ``train`` / ``holdout`` / ..., or None to use all of them.

    Returns
    -------
    The key (also written to ``key_path``).

    Raises
    ------
    TuringError
        ``n`` < 1, too few images, sizes that differ, the key inside ``out_dir``, or a
        sheet or key already there (nothing is overwritten).
    PdfError
        WeasyPrint cannot render the PDF (nothing is written then).
    """
    out_dir, key_path = Path(out_dir), Path(key_path)
    _check_inputs(real_images, synthetic_images, n)
    _check_destinations(out_dir, key_path)
    rng = np.random.default_rng(seed)
    if real_split is not None and int(np.sum(real_split == "holdout")) >= n:
        pool = np.flatnonzero(real_split == "holdout")
        real_pool = "holdout"
    else:
        pool = np.arange(len(real_images))
        held = 0 if real_split is None else int(np.sum(real_split == "holdout"))
        real_pool = f"all real slices (the holdout has {held}, fewer than {n})"
    real_index = np.sort(rng.choice(pool, size=n, replace=False))
    synthetic_index = _matching_draw(rng, real_labels, real_index, synthetic_labels, len(synthetic_images), n)
    drawn = [(REAL, int(i)) for i in real_index] + [(SYNTHETIC, int(i)) for i in synthetic_index]
    order = rng.permutation(len(drawn))
    width = max(3, len(str(2 * n)))
    ids = [f"T{k + 1:0{width}d}" for k in range(2 * n)]
    scale = max(1, round(DISPLAY_PX / real_images.shape[1]))
    pictures = []
    items: dict[str, dict[str, Any]] = {}
    for item_id, position in zip(ids, order, strict=True):
        truth, index = drawn[position]
        images, labels = (real_images, real_labels) if truth == REAL else (synthetic_images, synthetic_labels)
        pictures.append(array_data_uri(_as_uint8(images[index]), scale))
        items[item_id] = {
            "truth": truth,
            "label": None if labels is None else class_names[int(labels[index])],
            "source_index": index,
        }
    document = _sheet_html(ids, pictures, scale * real_images.shape[1])
    write_pdf(out_dir / PDF_FILE, document)  # first: the step most likely to fail
    write_html(out_dir / SHEET_FILE, document)
    with atomic_open(out_dir / ANSWERS_FILE, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ANSWER_COLUMNS)
        writer.writerows([item_id, "", ""] for item_id in ids)
    key = {
        "format": KEY_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_per_kind": n,
        "seed": seed,
        "real_pool": real_pool,
        "class_names": list(class_names),
        "image_size": int(real_images.shape[1]),
        "display_scale": scale,
        "sheet": str(out_dir / SHEET_FILE),
        "sheet_sha256": hashlib.sha256(document.encode("utf-8")).hexdigest(),
        "provenance": provenance,
        "items": items,
    }
    write_json_atomic(key_path, key)
    return key


def _matching_draw(
    rng: np.random.Generator,
    real_labels: np.ndarray | None,
    real_index: np.ndarray,
    synthetic_labels: np.ndarray | None,
    n_synthetic: int,
    n: int,
) -> np.ndarray:
    """Synthetic indices with the same class counts as the real draw where both have labels
    (otherwise the class mix itself would hint at the source); a class with too few
    synthetic images is topped up at random."""
    if real_labels is None or synthetic_labels is None:
        return np.sort(rng.choice(n_synthetic, size=n, replace=False))
    picked: list[int] = []
    for label, count in zip(*np.unique(real_labels[real_index], return_counts=True), strict=True):
        pool = np.flatnonzero(synthetic_labels == label)
        picked += rng.choice(pool, size=min(int(count), len(pool)), replace=False).tolist()
    rest = np.setdiff1d(np.arange(n_synthetic), picked)
    picked += rng.choice(rest, size=n - len(picked), replace=False).tolist()
    return np.sort(np.asarray(picked, dtype=np.int64))


def _check_inputs(real_images: np.ndarray, synthetic_images: np.ndarray, n: int) -> None:
    if n < 1:
        raise TuringError(f"n = {n}: the test needs at least one image of each kind")
    if real_images.ndim != 3 or synthetic_images.ndim != 3:
        raise TuringError("images must be (N, H, W) arrays of slices")
    if real_images.shape[1:] != synthetic_images.shape[1:]:
        # a size difference would give the answer away
        raise TuringError(
            f"real slices are {real_images.shape[1]}x{real_images.shape[2]} px but synthetic ones "
            f"{synthetic_images.shape[1]}x{synthetic_images.shape[2]} px; they must match"
        )
    for kind, images in ((REAL, real_images), (SYNTHETIC, synthetic_images)):
        if len(images) < n:
            raise TuringError(f"only {len(images)} {kind} slices for n = {n}; lower n")


def _check_destinations(out_dir: Path, key_path: Path) -> None:
    if key_path.resolve().is_relative_to(out_dir.resolve()):
        raise TuringError(
            f"key {key_path} lies inside {out_dir}, the folder handed to the expert; put the key elsewhere"
        )
    for path in (out_dir / SHEET_FILE, out_dir / PDF_FILE, out_dir / ANSWERS_FILE, key_path):
        if path.exists():
            raise TuringError(f"{path} already exists; choose another folder or key (nothing is overwritten)")


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """Slice sets may store float16 in 0..255; the sheet shows uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image


_STYLE = """
@page { size: A4; margin: 12mm; }
body {
  font-family: "DejaVu Sans", Arial, sans-serif;
  font-size: 10pt;
  color: #111;
  margin: 0 auto;
  max-width: 190mm;
}
h1 { font-size: 15pt; margin: 0 0 4pt 0; }
.instructions { border: 1px solid #999; padding: 4pt 10pt; margin-bottom: 8pt; page-break-after: always; }
.instructions li { margin: 3pt 0; }
code { font-family: "DejaVu Sans Mono", monospace; }
.items { orphans: 1; widows: 1; }
.item {
  display: inline-block;
  width: 42mm;
  margin: 0 1mm 4mm 1mm;
  vertical-align: top;
  break-inside: avoid;
  page-break-inside: avoid;
}
.item img {
  display: block;
  width: 40mm;
  height: 40mm;
  image-rendering: pixelated;
  border: 1px solid #666;
  background: #000;
}
.id { font-weight: bold; font-size: 11pt; margin-top: 2pt; }
.box {
  display: inline-block;
  width: 9pt;
  height: 9pt;
  border: 1px solid #111;
  vertical-align: middle;
  margin-right: 2pt;
}
.choice { margin-right: 6pt; }
.confidence { font-size: 8.5pt; }
.level {
  display: inline-block;
  border: 1px solid #111;
  border-radius: 50%;
  width: 11pt;
  text-align: center;
  margin-left: 1pt;
}
"""


def _sheet_html(ids: list[str], pictures: list[str], display_px: int) -> str:
    """The expert's sheet. Every item is built from the same template: only its id and its
    picture differ, so nothing but the image itself can hint at its source."""
    total = len(ids)
    items = "\n".join(
        f'<div class="item"><img src="{picture}" alt="image {esc(item_id)}" width="{display_px}" '
        f'height="{display_px}"><div class="id">{esc(item_id)}</div>'
        '<div class="answer"><span class="choice"><span class="box"></span>real</span>'
        '<span class="choice"><span class="box"></span>synthetic</span></div>'
        '<div class="confidence">sure: '
        + "".join(f'<span class="level">{level}</span>' for level in _CONFIDENCE_LEVELS)
        + "</div></div>"
        for item_id, picture in zip(ids, pictures, strict=True)
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Visual Turing test: {total} images</title>
<style>{_STYLE}</style>
</head>
<body>
<div class="instructions">
<h1>Visual Turing test: {total} images</h1>
<p>Some of these images are real slices from patients' scans. The others were made by a
computer program (a generative model) that learned from real scans. Half are real, half are synthetic.
We want to know whether an expert can tell them apart.</p>
<ol>
<li>Look at each image and tick one box: <b>real</b> or <b>synthetic</b>. If you are unsure, make your best
guess; please do not leave any image blank (blanks are counted as unanswered).</li>
<li>If you like, circle how sure you are: 1 = a guess, 5 = certain.</li>
<li>The images are in random order. Their numbers (T001, T002, ...) are only labels and say nothing about
the answer. There is no time limit. Please work alone and do not discuss the images until you have
finished.</li>
<li>Return your answers in <code>answers.csv</code>, one row per image: write <code>real</code> or
<code>synthetic</code> in the <code>answer</code> column and, if you wish, 1 to 5 in <code>confidence</code>.
You may instead return this printed sheet with the boxes ticked.</li>
</ol>
</div>
<div class="items">
{items}
</div>
</body>
</html>
"""


# --- scoring -----------------------------------------------------------------------------
def read_key(path: str | Path) -> dict[str, Any]:
    """Load a key written by :func:`make_test`.

    Raises
    ------
    TuringError
        Missing, not JSON, or not a Turing test key (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise TuringError(f"{path}: no such key file")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TuringError(f"{path}: not a JSON key ({err})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(key.get("items"), dict):
        raise TuringError(f"{path}: not a fedsynth Turing test key (format {KEY_FORMAT!r} expected)")
    return key


def read_answers(path: str | Path) -> list[dict[str, str]]:
    """The rows of an answers CSV (header ``id,answer[,confidence]``).

    Raises
    ------
    TuringError
        Missing file, or no ``id`` / ``answer`` column (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise TuringError(f"{path}: no such answers file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets add a BOM
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "id" not in columns or "answer" not in columns:
                raise TuringError(
                    f"{path}: needs columns id and answer (found {', '.join(columns) or 'none'})"
                )
            reader.fieldnames = columns
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise TuringError(f"{path}: not a readable CSV ({err})") from None


def score(key: Mapping[str, Any], answers_rows: Iterable[Mapping[str, str]]) -> dict[str, Any]:
    """Score an expert's answers against the key.

    Answers are ``real``/``synthetic`` (or ``r``/``s``), in any case; an empty answer, or
    an id with no row, is *missing*: listed, and left out of the accuracy rather than
    counted as right. Rows are numbered as lines of a CSV file whose line 1 is the header.

    Returns
    -------
    dict with ``accuracy`` (right / answered), ``accuracy_ci95`` (Clopper-Pearson),
    ``p_value`` (two-sided exact binomial test against 0.5), ``n_items``, ``n_answered``,
    ``n_correct``, ``missing`` (ids), ``sensitivity`` (synthetic called synthetic),
    ``specificity`` (real called real), ``per_class`` (where labels are known),
    ``by_confidence`` and ``interpretation`` (one plain sentence).

    Raises
    ------
    TuringError
        An answer that is not real/synthetic/r/s or a confidence not 1..5 (naming the id
        and line), an id twice, ids not in the key (naming them), or no answer at all.
    """
    items: Mapping[str, Mapping[str, Any]] = key["items"]
    given: dict[str, tuple[str, str | None]] = {}
    unknown: list[str] = []
    for row_number, row in enumerate(answers_rows, start=2):
        item_id = (row.get("id") or "").strip()
        if not item_id:
            continue
        if item_id not in items:
            unknown.append(item_id)
            continue
        if item_id in given:
            raise TuringError(f"line {row_number} (id {item_id}): {item_id} is answered twice")
        answer = (row.get("answer") or "").strip().lower()
        confidence = (row.get("confidence") or "").strip() or None
        if answer and answer not in _ANSWER_WORDS:
            raise TuringError(
                f"line {row_number} (id {item_id}): answer {row.get('answer')!r} is not real or synthetic (r "
                "or s)"
            )
        if confidence is not None and confidence not in _CONFIDENCE_LEVELS:
            raise TuringError(f"line {row_number} (id {item_id}): confidence {confidence!r} is not 1 to 5")
        if answer:
            given[item_id] = (_ANSWER_WORDS[answer], confidence)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise TuringError(f"ids not in the key: {shown} (answers for another sheet?)")
    if not given:
        raise TuringError("no id has an answer (real or synthetic)")
    missing = [item_id for item_id in items if item_id not in given]
    right = {item_id: given[item_id][0] == items[item_id]["truth"] for item_id in given}
    n_correct = sum(right.values())
    from scipy.stats import binomtest  # SciPy loads when answers are scored, not with the CLI

    test = binomtest(n_correct, len(given), 0.5, alternative="two-sided")
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    accuracy = n_correct / len(given)

    def rate(truth: str) -> float | None:
        ids = [i for i in given if items[i]["truth"] == truth]
        return sum(right[i] for i in ids) / len(ids) if ids else None

    per_class: dict[str, dict[str, Any]] = {}
    for item_id in given:
        label = items[item_id].get("label")
        if label is not None:
            entry = per_class.setdefault(label, {"n": 0, "correct": 0, "real": 0, "synthetic": 0})
            entry["n"] += 1
            entry["correct"] += int(right[item_id])
            entry[items[item_id]["truth"]] += 1
    for entry in per_class.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    by_confidence: dict[str, dict[str, Any]] = {}
    for item_id, (_, confidence) in given.items():
        if confidence is not None:
            entry = by_confidence.setdefault(confidence, {"n": 0, "correct": 0})
            entry["n"] += 1
            entry["correct"] += int(right[item_id])
    for entry in by_confidence.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    return {
        "accuracy": accuracy,
        "accuracy_ci95": [float(ci.low), float(ci.high)],
        "p_value": float(test.pvalue),
        "n_items": len(items),
        "n_answered": len(given),
        "n_correct": n_correct,
        "missing": missing,
        "sensitivity": rate(SYNTHETIC),
        "specificity": rate(REAL),
        "per_class": dict(sorted(per_class.items())),
        "by_confidence": dict(sorted(by_confidence.items())),
        "interpretation": _interpret(
            accuracy, float(test.pvalue), (float(ci.low), float(ci.high)), len(given), len(missing)
        ),
    }


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def _interpret(accuracy: float, p: float, ci: tuple[float, float], answered: int, missing: int) -> str:
    figures = f"accuracy {accuracy:.2f}, 95% CI {ci[0]:.2f}-{ci[1]:.2f}, {_format_p(p)}, {answered} answers"
    if p >= 0.05:
        sentence = f"the expert could not tell synthetic from real better than chance ({figures})"
        if ci[1] - ci[0] > 0.3:  # a wide interval: few answers, so only gross differences would show
            sentence += "; with this few answers only a large difference would have shown"
    elif accuracy > 0.5:
        sentence = f"the expert told them apart ({figures})"
    else:
        sentence = (
            f"the expert was wrong more often than chance ({figures}): something tells the images apart, but "
            "the expert took it the wrong way round"
        )
    if missing:
        sentence += f"; {missing} image{'s' if missing != 1 else ''} left unanswered"
    return sentence + "."
