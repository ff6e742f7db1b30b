"""The ethics-review report: audit.json (a hospital's, or the consortium's combination
of hospital shares) as one self-contained HTML file and its PDF.

Written for a committee: each section opens with what the result means in plain words;
the tables and figures behind it follow for the expert. Everything is read from the
audit's own files, so a report can be rebuilt from an audit folder at any time
(``fedsynth report``). The consortium report is drawn from hospital shares alone and has
no image of any hospital in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsynth.audit.documents import PdfError, esc, png_data_uri, write_html, write_pdf
from fedsynth.audit.pipeline import AUDIT_FILE, FIGURES
from fedsynth.audit.plots import plot_dcr_counts, plot_epsilon, plot_roc
from fedsynth.audit.utility import DP_SGD, ORACLE, SYNTHETIC_ONLY
from fedsynth.audit.verdicts import AMBER, GREEN, RED, THRESHOLDS
from fedsynth.core.files import write_json_atomic

__all__ = ["CONSORTIUM_FILE", "REPORT_HTML", "REPORT_PDF", "render_consortium_report", "render_report"]

REPORT_HTML, REPORT_PDF = "report.html", "report.pdf"
CONSORTIUM_FILE = "consortium.json"

CHECK_TITLES = {
    "formal_privacy": "Formal privacy guarantee (differential privacy)",
    "copying": "Copying of training images",
    "membership_inference": "Membership inference",
    "fidelity": "Fidelity (realism)",
    "utility": "Utility for a diagnostic classifier",
}

# one plain sentence per check and light, for the lay reader
MEANING = {
    "formal_privacy": {
        GREEN: "A mathematical guarantee (ε ≤ 1) bounds what anyone can learn about any one {unit} from the "
        "model.",
        AMBER: "A mathematical guarantee exists but is weak (1 < ε ≤ 10): it limits, but does not rule out, "
        "learning about one {unit}.",
        RED: "There is no meaningful mathematical guarantee (no DP-SGD, or ε above 10); privacy rests on the "
        "empirical tests below only.",
    },
    "copying": {
        GREEN: "The synthetic images are no closer to the training patients' images than images of new "
        "patients are: no sign of copying.",
        AMBER: "Some synthetic images sit closer to training images than new patients' images do; a reviewer "
        "should look at the closest pairs before release.",
        RED: "The generator reproduces training images, or sits measurably closer to them than to new "
        "patients: do not release these images.",
    },
    "membership_inference": {
        GREEN: "Someone holding the synthetic images cannot tell who was in the training data better than "
        "chance, with the attacks tried.",
        AMBER: "The attacks tell who was in the training data slightly better than chance.",
        RED: "The attacks tell who was in the training data clearly better than chance.",
    },
    "fidelity": {
        GREEN: "The synthetic images are statistically close to real ones and cover their variety.",
        AMBER: "The synthetic images resemble real ones only partly, or cover part of their variety.",
        RED: "The synthetic images are easy to tell from real ones statistically, or cover little of their "
        "variety.",
    },
    "utility": {
        GREEN: "Adding synthetic images made a diagnostic classifier better, beyond what re-using real "
        "images gives.",
        AMBER: "No measurable benefit to a diagnostic classifier (or it could not be measured).",
        RED: "Adding synthetic images made a diagnostic classifier worse.",
    },
}

LIMITATIONS = [
    "The formal guarantee (ε) covers what the trained model reveals about one {unit} of the hospitals that "
    "used DP-SGD. It does not cover the hospitals' slice counts and timing (sent to the coordinator in the "
    "clear), nor a hospital that trained without DP, nor data used outside training (e.g. the audit "
    "itself).",
    "The empirical tests (copying, membership inference) can show a leak; they cannot prove its absence. "
    "They measure these attacks on these synthetic images; a stronger attacker or more images may do "
    "better.",
    "Every privacy figure is judged against fresh real data: the holdout, patients the generator never "
    "saw. A small holdout makes the reference noisy; the tests account for it with p-values, which a small "
    "site may not reach.",
    "The audit's own autoencoder is fit on these real slices, and the classifier space on the training "
    "slices and their classes; the copy detector (the pixels space) compares pixels once a mirror, "
    "rotation, zoom, shift or intensity curve is undone, and misses the disguises it lists. The "
    "classifier space's fidelity is scored against half of the holdout, beside the other half. FID is "
    "computed only with supplied Inception-v3 weights, which "
    "were trained on natural photographs, not medical images.",
    "Traffic-light thresholds are this project's choices, written in the appendix; the committee may set "
    "its own.",
    "Utility is measured on one task (the slice labels) with one classifier architecture; a gain there "
    "does not imply a gain on another clinical task.",
]

FORMULAS = [
    (
        "Distance to closest record (DCR)",
        "d(x) = min over training images t of ‖f(x) − f(t)‖, f a feature map; in the pixels space the "
        "minimum is also over the disguises the copy detector undoes (mirror, rotation, zoom, shift, "
        "intensity curve). Median ratio = median DCR(synthetic) / median DCR(holdout).",
    ),
    (
        "Closer-to-train share",
        "share of synthetic images nearer a holdout-sized random subset of training images than to the "
        "holdout; 0.5 for a generator that never saw them. Copying-equivalent = (share − 0.5) / (s/2), s "
        "the subset's share of training patients; tested counting each nearest real image once.",
    ),
    (
        "Near copies",
        "synthetic images with DCR below the 1st percentile of holdout DCRs (fresh data: ~1% by "
        "construction), tested against a binomial null; exact copies always count.",
    ),
    (
        "C_T (Meehan et al., 2020)",
        "z-score comparing synthetic and holdout distances to training images within k-means cells; "
        "strongly negative means data copying.",
    ),
    (
        "Authenticity (Alaa et al., 2022)",
        "share of synthetic images farther from their nearest training image than that image is from its "
        "own nearest training neighbour; compared with the holdout's share.",
    ),
    (
        "Membership inference",
        "score per record (negative distance to synthetic images, density of synthetic images, or the "
        "hospital's discriminator); a patient's score is the mean over its slices. AUC and true positive "
        "rate at 1% false positives; empirical ε lower bound = log((TPR_low − δ) / FPR_high) with "
        "Clopper-Pearson bounds on a held-out half.",
    ),
    (
        "Fréchet distance",
        "‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between feature Gaussians; judged as the ratio FD(train, "
        "synthetic) / FD(train, holdout).",
    ),
    (
        "Precision, recall, density, coverage (Naeem et al., 2020)",
        "k-nearest-neighbour manifolds, k = 5; coverage = share of real images with a synthetic image "
        "inside their k-NN ball.",
    ),
    (
        "Utility gain",
        "balanced accuracy on the holdout of a classifier trained on real + class-balanced synthetic "
        "images, minus that of one trained on real + the same number of re-drawn real images, same steps; "
        "mean over seeds with a patient-level bootstrap 95% interval.",
    ),
    (
        "Differential privacy",
        "(ε, δ)-DP of the discriminator's training under DP-SGD, per privacy unit, composed over all "
        "rounds by the RDP accountant (and PRV where ε ≤ 100); the generator is post-processing.",
    ),
]

CSS = """
@page { size: A4; margin: 14mm 14mm 16mm 14mm;
        @bottom-right { content: "page " counter(page) " of " counter(pages); font-size: 8pt; color: #666; } }
body { font-family: "DejaVu Sans", "Helvetica", "Arial", sans-serif; font-size: 10pt; color: #1a1a1a;
       max-width: 1000px; margin: 0 auto; padding: 12px; line-height: 1.4; }
h1 { font-size: 18pt; margin-bottom: 2px; }
h2 { font-size: 13pt; border-bottom: 2px solid #1a4d80; padding-bottom: 2px; margin-top: 22px; color: #1a4d80;
     page-break-after: avoid; }
h3 { font-size: 11pt; margin-bottom: 4px; page-break-after: avoid; }
.subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 6px 0 10px; width: 100%; page-break-inside: avoid; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; font-size: 8.5pt; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.light { font-weight: bold; text-transform: uppercase; text-align: center; white-space: nowrap; width: 60px; }
.green { background: #2e7d32; color: #fff; }
.amber { background: #f9a825; color: #1a1a1a; }
.red { background: #c62828; color: #fff; }
.meaning { font-size: 9.5pt; }
figure { margin: 8px 0 12px; page-break-inside: avoid; text-align: center; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figure.gallery img { max-height: 200mm; max-width: 60%; }
figcaption { font-size: 8.5pt; color: #444; margin-top: 3px; }
.pair { display: flex; gap: 10px; } .pair figure { flex: 1; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: 4px 8px; margin: 6px 0; }
.plain { background: #f4f7fa; border-left: 4px solid #1a4d80; padding: 6px 10px; margin: 6px 0 10px; }
pre { font-size: 7.5pt; background: #f6f6f6; padding: 6px; white-space: pre-wrap; word-break: break-all; }
code { font-size: 8.5pt; word-break: break-all; }
.muted { color: #666; }
"""


# --- small HTML builders -------------------------------------------------------------------------


def _light(verdict: str) -> str:
    return f'<td class="light {esc(verdict)}">{esc(verdict)}</td>'


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value in (float("inf"), float("-inf")):
            return "∞" if value > 0 else "−∞"
        text = f"{value:.{digits}g}"
        return f"{value:,.0f}" if "e+" in text and abs(value) < 1e7 else text
    return esc(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _numcell(value: Any, digits: int = 3) -> str:
    return f'<td class="num">{_num(value, digits)}</td>'


def _figure(folder: Path, relative: str | None, caption: str, cls: str = "") -> str:
    if not relative or not (folder / relative).is_file():
        return ""
    return (
        f'<figure class="{cls}"><img src="{png_data_uri(folder / relative)}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _plain(text: str) -> str:
    return f'<div class="plain">{text}</div>'


def _document(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(
        f'<section id="s{i}"><h2>{i}. {esc(name)}</h2>{html}</section>'
        for i, (name, html) in enumerate(sections, start=1)
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class="subtitle">{esc(subtitle)}</p>'
        f"{body}</body></html>"
    )


def _summary_table(summary: Mapping[str, str], checks: Mapping[str, Mapping[str, Any]], unit: str) -> str:
    rows = []
    for name, verdict in summary.items():
        sentence = MEANING.get(name, {}).get(verdict, "").format(unit=unit)
        note = checks.get(name, {}).get("note")
        detail = f'<div class="meaning">{esc(sentence)}</div>' + (
            f'<div class="muted">{esc(note)}</div>' if note else ""
        )
        rows.append([f"<b>{esc(CHECK_TITLES.get(name, name))}</b>", _light(verdict), detail])
    return _table(["check", "verdict", "what it means"], rows, "summary")


def _figure_rows(check: Mapping[str, Any], with_space: bool = True) -> str:
    rows = []
    for row in check.get("figures", []):
        rows.append(
            [
                esc(row.get("figure", ""))
                + (
                    f' <span class="muted">({esc(row["space"])})</span>'
                    if with_space and row.get("space")
                    else ""
                ),
                _numcell(row.get("value")),
                _numcell(row.get("reference")),
                _light(row["verdict"]),
                esc(row.get("meaning", "")),
            ]
        )
    if not rows:
        return ""
    return _table(["figure", "value", "fresh real data", "verdict", "meaning"], rows)


def _limitations(unit: str) -> str:
    return "<ul>" + "".join(f"<li>{esc(text.format(unit=unit))}</li>" for text in LIMITATIONS) + "</ul>"


def _appendix() -> str:
    rules = _table(["figure", "rule"], [[esc(name), esc(rule["rule"])] for name, rule in THRESHOLDS.items()])
    formulas = _table(["quantity", "definition"], [[f"<b>{esc(n)}</b>", esc(d)] for n, d in FORMULAS])
    return f"<h3>Thresholds (traffic lights)</h3>{rules}<h3>Formulas</h3>{formulas}"


def _ledger_table(ledger_by_hospital: Mapping[str, list[Mapping[str, Any]]]) -> str:
    rows = []
    for hospital, ledger in ledger_by_hospital.items():
        if not ledger:
            rows.append([esc(hospital), *["—"] * 9, '<td class="light red">no DP</td>'])
            continue
        last = max(ledger, key=lambda r: r.get("round") or 0)
        rows.append(
            [
                esc(hospital),
                _numcell(last.get("units")),
                _numcell(last.get("sample_rate")),
                _numcell(last.get("noise_multiplier")),
                _numcell(last.get("max_grad_norm")),
                _numcell(last.get("steps")),
                _numcell(last.get("delta")),
                _numcell(last.get("epsilon_rdp"), 4),
                _numcell(last.get("epsilon_prv"), 4),
                _numcell(last.get("round")),
                _light(_epsilon_light(last.get("epsilon_rdp"))),
            ]
        )
    return _table(
        [
            "hospital",
            f"N ({_unit_of(ledger_by_hospital)}s)",
            "q (sampling rate)",
            "σ (noise)",
            "clip C",
            "steps (all rounds)",
            "δ",
            "ε (RDP)",
            "ε (PRV)",
            "after round",
            "verdict",
        ],
        rows,
    )


def _unit_of(ledger_by_hospital: Mapping[str, list[Mapping[str, Any]]]) -> str:
    units = {
        r.get("privacy_unit") for rows in ledger_by_hospital.values() for r in rows if r.get("privacy_unit")
    }
    return str(units.pop()) if len(units) == 1 else "unit"


def _epsilon_light(eps: float | None) -> str:
    rule = THRESHOLDS["epsilon"]
    if eps is None:
        return RED
    return GREEN if eps <= rule["amber"] else AMBER if eps <= rule["red"] else RED


NOT_COVERED = (
    "What the guarantee does not cover: the number of slices and the timing each hospital reports to the "
    "coordinator; any hospital that trained without DP-SGD; repeated runs on the same data beyond the "
    "ledger shown (each hospital's ledger persists across runs of the same slice set); and the audit "
    "itself, which reads the real slices. ε is an upper bound on the privacy loss of one {unit}: smaller is "
    "better, and values above 10 give little practical protection."
)


# --- the hospital's (or single-site) report -------------------------------------------------------


def render_report(folder: str | Path, *, pdf: bool = True) -> tuple[Path, Path | None, str | None]:
    """Write report.html (and report.pdf) in an audit folder from its audit.json and figures.

    Returns
    -------
    (html path, pdf path or None, why the PDF was not written or None)

    Raises
    ------
    FileNotFoundError
        The folder holds no audit.json.
    """
    folder = Path(folder)
    audit = json.loads((folder / AUDIT_FILE).read_text())
    document = build_report_html(audit, folder)
    html_path = write_html(folder / REPORT_HTML, document)
    return (html_path, *_maybe_pdf(folder / REPORT_PDF, document, pdf))


def _maybe_pdf(path: Path, document: str, wanted: bool) -> tuple[Path | None, str | None]:
    if not wanted:
        return None, "not asked for (--no-pdf)"
    try:
        return write_pdf(path, document), None
    except PdfError as err:
        return None, str(err)


def build_report_html(audit: Mapping[str, Any], folder: Path) -> str:
    """The report of one audit (one hospital's, or a pooled or single-site audit)."""
    inputs, ctx = audit["inputs"], audit.get("context") or {}
    unit = inputs.get("privacy_unit", "slice")
    hospital = ctx.get("hospital")
    title = "Synthetic image audit" + (f": {hospital} (local report)" if hospital else "")
    subtitle = (
        f"{inputs['synthetic_images']:,} synthetic images of {inputs['image_size']} px against "
        f"{inputs['train_images']:,} training and {inputs['holdout_images']:,} holdout slices"
        + (f"; generator of round {inputs['round']}" if inputs.get("round") is not None else "")
        + (f"; run created {ctx['run']['created']}" if ctx.get("run", {}).get("created") else "")
    )
    sections = [
        ("Executive summary", _executive(audit, unit, local=bool(hospital))),
        ("Scope and data", _scope(audit, unit)),
        ("Model and training", _model(audit, folder)),
        ("Formal privacy guarantee", _formal(audit, folder, unit)),
        ("Empirical privacy", _empirical(audit, folder, unit, local=True)),
        ("Fidelity", _fidelity(audit, folder)),
        ("Utility", _utility(audit, folder)),
        ("Limitations and residual risk", _limitations(unit) + _appendix()),
    ]
    return _document(title, subtitle, sections)


def _executive(audit: Mapping[str, Any], unit: str, *, local: bool) -> str:
    lead = (
        "This report tells a review board how private and how useful the synthetic images are. Each line "
        "below is a traffic light: green means no concern was found, amber means a reviewer should look, "
        "red means a measured problem. Every figure is set beside what images of new patients (the holdout, "
        "never used for training) score, so 'as good as fresh real data' is the standard."
    )
    if local:
        lead += (
            " This is a hospital's local report: it contains images of the hospital's own patients and "
            "stays at the hospital; the consortium receives only the aggregate statistics."
        )
    return _plain(esc(lead)) + _summary_table(audit["summary"], audit["checks"], unit)


def _scope(audit: Mapping[str, Any], unit: str) -> str:
    inputs, ctx = audit["inputs"], audit.get("context") or {}
    rows = [
        [
            esc(name),
            _numcell(h.get("train_slices")),
            _numcell(h.get("train_patients")),
            _numcell(h.get("holdout_slices")),
            _numcell(h.get("holdout_patients")),
        ]
        for name, h in (ctx.get("hospitals") or {}).items()
    ]
    rows.append(
        [
            "<b>audited</b>",
            _numcell(inputs["train_images"]),
            _numcell(inputs["train_patients"]),
            _numcell(inputs["holdout_images"]),
            _numcell(inputs["holdout_patients"]),
        ]
    )
    preprocessing = ctx.get("preprocessing") or []
    classes = ", ".join(inputs.get("class_names", []))
    text = (
        f"<p>Privacy unit: <b>{esc(unit)}</b>"
        + (
            " (each patient's slices are treated as one record: sampled together, attacked together)."
            if unit == "patient"
            else " (no patient ids were known, so each slice counts as one person; slices "
            "of one patient may fall on both sides of the split)."
        )
        + f" Classes: {esc(classes)}. Train and holdout are split by patient: no patient is in both.</p>"
    )
    table = _table(["hospital", "train slices", "train patients", "holdout slices", "holdout patients"], rows)
    source = f'<p class="muted">Real slices: {esc(inputs.get("real_slices", "—"))}</p>'
    prep = (
        "<h3>Preprocessing</h3><ul>" + "".join(f"<li>{esc(step)}</li>" for step in preprocessing) + "</ul>"
        if preprocessing
        else ""
    )
    return text + table + source + prep


def _model(audit: Mapping[str, Any], folder: Path | None = None) -> str:
    inputs, ctx = audit["inputs"], audit.get("context") or {}
    cfg, run, model = ctx.get("config") or {}, ctx.get("run") or {}, ctx.get("model") or {}
    train, fed, dp = cfg.get("train", {}), cfg.get("federation", {}), cfg.get("dp", {})
    rows = [
        (
            "generator / discriminator",
            f"{esc(model.get('name', cfg.get('model', {}).get('name', '—')))}: "
            f"{_num(model.get('generator_parameters'))} / {_num(model.get('discriminator_parameters'))} "
            "parameters",
        ),
        ("rounds, local steps per round", f"{_num(fed.get('rounds'))}, {_num(train.get('local-steps'))}"),
        (
            "batch size, learning rates (G / D), loss",
            f"{_num(train.get('batch-size'))}, {_num(train.get('lr-g'))} / {_num(train.get('lr-d'))}, "
            f"{esc(train.get('loss', '—'))}",
        ),
        (
            "DP-SGD on the discriminator",
            esc(
                f"noise multiplier {dp.get('noise-multiplier')}, clip {dp.get('max-grad-norm')}, target ε "
                f"{dp.get('target-epsilon')}"
            )
            if dp
            else "—",
        ),
        (
            "audited generator",
            f"round {_num(inputs.get('round'))}, checkpoint SHA-256 "
            f"<code>{esc(inputs.get('checkpoint_sha256') or inputs.get('synthetic_sha256') or '—')}</code>",
        ),
        ("configuration", f"SHA-256 <code>{esc(ctx.get('config_sha256', '—'))}</code> (in full below)"),
        (
            "seeds",
            esc(", ".join(f"{k} {v}" for k, v in (run.get("seeds") or {}).items()) or "—")
            + f"; audit seed {_num(audit.get('options', {}).get('seed'))}",
        ),
        (
            "software",
            esc(", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items()) or "—")
            + esc(f"; Python {run.get('python', '—')}"),
        ),
        ("code revision", f"<code>{esc(run.get('git_revision') or '—')}</code>"),
        (
            "audit feature spaces",
            "; ".join(
                f"{esc(name)}: {esc(space.get('kind', ''))} "
                f"<code>{esc(str(space.get('sha256', ''))[:16])}</code>"
                for name, space in audit.get("feature_spaces", {}).items()
                if space.get("kind")
            ),
        ),
    ]
    if ctx.get("best_round") is not None:
        rows.insert(
            5,
            (
                "best round by validation",
                f"round {_num(ctx['best_round'])} (lowest Fréchet distance to the hospitals' validation "
                "patients; the audit holdout is not used)",
            ),
        )
    table = _table(["", ""], [[f"<b>{esc(k)}</b>", v] for k, v in rows])
    if folder is not None:
        table += _figure(
            folder,
            audit.get("figures", {}).get("training_curves"),
            "Training over rounds, per hospital: discriminator and generator loss, the validation Fréchet "
            "distance (with the best round) and, for DP runs, epsilon spent.",
        )
    yaml_text = ctx.get("config_yaml")
    return table + (f"<h3>Configuration</h3><pre>{esc(yaml_text)}</pre>" if yaml_text else "")


def _copy_detector(detector: Mapping[str, Any]) -> str:
    """What the pixel space's copy detector undoes before measuring, and what it does not."""
    covers, missed = detector.get("covers") or [], detector.get("does_not_cover") or []
    if not covers and not missed:
        return ""
    return _plain(
        esc(
            "In the pixels space a synthetic image is compared with each training image after the disguise a "
            "generator copies under is undone: "
            + "; ".join(covers)
            + ". Not undone, so not caught as copies: "
            + "; ".join(missed)
            + "."
        )
    )


def _formal(audit: Mapping[str, Any], folder: Path, unit: str) -> str:
    privacy = audit.get("privacy", {})
    check = audit["checks"]["formal_privacy"]
    lead = _plain(
        esc(MEANING["formal_privacy"][check["verdict"]].format(unit=unit))
        + (f" {esc(check['note'])}" if check.get("note") else "")
    )
    ledger = privacy.get("ledger") or []
    by_hospital: dict[str, list[Mapping[str, Any]]] = {}
    for row in ledger:
        by_hospital.setdefault(row["hospital"], []).append(row)
    html = lead
    if by_hospital:
        html += _ledger_table(by_hospital) + _warm_start(ledger)
        html += _figure(
            folder,
            audit.get("figures", {}).get("epsilon_rounds"),
            "ε spent by each hospital after each round (cumulative, log scale)",
        )
    client = privacy.get("client_level")
    if client:
        html += f"<p>Client-level DP on the server: {esc(json.dumps(client))}</p>"
    return html + f"<p>{esc(NOT_COVERED.format(unit=unit))}</p>"


def _warm_start(ledger: list[Mapping[str, Any]]) -> str:
    """What the ledger says of a warm start (``train.init-from``): the checkpoint, its hash,
    and that the guarantee rests on its data being public."""
    starts = {row["warm_start"]["sha256"]: row["warm_start"] for row in ledger if row.get("warm_start")}
    return "".join(
        f"<p><strong>Warm start.</strong> The generator started from <code>{esc(w['checkpoint'])}</code> "
        f"(sha256 <code>{esc(w['sha256'])}</code>), trained on data the operator declared public; nothing "
        "was charged for it. The guarantee above holds only if that declaration is true: a patient whose "
        "slices were in that data is not protected by it.</p>"
        for w in starts.values()
    )


def _empirical(audit: Mapping[str, Any], folder: Path, unit: str, *, local: bool) -> str:
    checks, memo, figs = audit["checks"], audit.get("memorization", {}), audit.get("figures", {})
    html = _plain(
        esc(MEANING["copying"][checks["copying"]["verdict"]])
        + " "
        + esc(MEANING["membership_inference"][checks["membership_inference"]["verdict"]])
    )
    html += "<h3>Copying</h3>" + _figure_rows(checks["copying"])
    if checks["copying"].get("note"):
        html += f'<div class="note">{esc(checks["copying"]["note"])}</div>'
    html += _copy_detector(audit.get("feature_spaces", {}).get("pixels", {}))
    rows = []
    for space, m in memo.items():
        near, share, ct, auth = m["near_copies"], m["closer_to_train"], m["c_t"], m["authenticity"]
        rows.append(
            [
                esc(space),
                _numcell(m["dcr"]["median_ratio"]),
                _numcell(share["share"]),
                _numcell(share.get("p_value")),
                _numcell(ct["c_t"]),
                _numcell(auth["synthetic"]),
                _numcell(auth["holdout"]),
                f'<td class="num">{near["count"]:,} ({_num(near["share"])})</td>',
                _numcell(near.get("exact_copies")),
            ]
        )
    if rows:
        html += _table(
            [
                "space",
                "DCR median ratio",
                "closer to train",
                "p",
                "C_T",
                "authenticity (synthetic)",
                "authenticity (holdout)",
                "near copies",
                "exact copies",
            ],
            rows,
        )
    whole = {
        space: m["closer_to_train"]["whole_set"]
        for space, m in memo.items()
        if m["closer_to_train"].get("within_classes")
    }
    if whole:
        html += _plain(
            "Closer to train is measured within each class (a class's synthetic images against that "
            "class's training and fresh patients) and pooled: a holdout whose class mix differs from "
            "train's would tilt it over the whole set. Over the whole set it is "
            + "; ".join(f"{esc(k)} {v['share']:.1%} (p {_num(v['p_value'])})" for k, v in whole.items())
            + "."
            + "".join(
                f" In {esc(k)}, not measured (fewer than 2 slices on one side, or no synthetic image): "
                + ", ".join(esc(c) for c in skipped)
                + "."
                for k, m in memo.items()
                if (skipped := m["closer_to_train"].get("skipped_classes"))
            )
        )
    html += _figure(
        folder,
        figs.get("dcr_histograms"),
        "Distance to the closest record: synthetic → nearest training image, synthetic → nearest holdout "
        "image, and holdout → nearest training image (fresh real data, black). Copying shows as synthetic "
        "mass left of the black curve.",
    )
    if local:
        html += _figure(
            folder,
            figs.get("closest_pairs"),
            "The synthetic images closest to a training image, closest first. Each row: the synthetic image; "
            "the same image with the disguise the detector found undone (named on the left, with the "
            "distance to that training image and to the nearest holdout image); that training image; the "
            "synthetic "
            "image undone for its nearest holdout image; that holdout image. A reviewer should see no "
            "synthetic image that is the same picture as its training neighbour. This gallery shows "
            "patients' images and stays at the hospital.",
            "gallery",
        )
    html += "<h3>Membership inference</h3>" + _figure_rows(checks["membership_inference"])
    attacks = audit.get("membership_inference", {}).get("attacks", {})
    if attacks:
        html += _table(
            [
                "attack",
                "AUC",
                "p (AUC > 0.5)",
                "TPR at 1% FPR",
                "empirical ε lower bound",
                f"members / non-members ({unit}s)",
            ],
            [
                [
                    esc(name),
                    _numcell(a["auc"]),
                    _numcell(a["auc_p_value"]),
                    _numcell(a["tpr_at_1pct_fpr"]),
                    _numcell(a["epsilon_lower_bound"]),
                    f'<td class="num">{a["members"]} / {a["non_members"]}</td>',
                ]
                for name, a in attacks.items()
            ],
        )
    html += _figure(
        folder,
        figs.get("mia_roc"),
        "Membership-inference ROC on log axes: the share of training patients an attacker finds against "
        "the share of new patients wrongly accused. The dashed diagonal is guessing.",
    )
    return html


def _fidelity(audit: Mapping[str, Any], folder: Path) -> str:
    fid, check, figs = audit.get("fidelity", {}), audit["checks"]["fidelity"], audit.get("figures", {})
    html = _plain(esc(MEANING["fidelity"][check["verdict"]])) + _figure_rows(check)
    enc = fid.get("encoder", {})
    rows = []
    cls = fid.get("classifier", {})
    if cls.get("computed"):
        fd, kid, prdc = cls["frechet_distance"], cls["kid"], cls["prdc"]
        rows.append(
            [
                "Fréchet distance to the holdout (classifier)",
                _numcell(fd["synthetic"]),
                _numcell(fd["holdout"]),
            ]
        )
        rows.append(
            [
                "KID to the holdout (classifier)",
                _numcell(kid["synthetic"]["mean"]),
                _numcell(kid["holdout"]["mean"]),
            ]
        )
        for key in ("precision", "recall", "density", "coverage"):
            rows.append(
                [
                    f"{key} (classifier, k = 5)",
                    _numcell(prdc["synthetic"][key]),
                    _numcell(prdc["holdout"][key]),
                ]
            )
    if enc:
        fd, kid, prdc = enc["frechet_distance"], enc["kid"], enc["prdc"]
        rows.append(
            ["Fréchet distance to train (encoder)", _numcell(fd["synthetic"]), _numcell(fd["holdout"])]
        )
        rows.append(
            ["KID to train (encoder)", _numcell(kid["synthetic"]["mean"]), _numcell(kid["holdout"]["mean"])]
        )
        for key in ("precision", "recall", "density", "coverage"):
            rows.append(
                [f"{key} (encoder, k = 5)", _numcell(prdc["synthetic"][key]), _numcell(prdc["holdout"][key])]
            )
    inception = fid.get("inception")
    if inception:
        rows.append(
            [
                "FID (Inception-v3)",
                _numcell(inception["fid"]["synthetic"]),
                _numcell(inception["fid"]["holdout"]),
            ]
        )
    ssim = fid.get("ssim_psnr_class_matched")
    if ssim:
        rows.append(
            [
                "SSIM with a random training image of the same class",
                _numcell(ssim["synthetic"].get("ssim_mean")),
                _numcell(ssim["holdout"].get("ssim_mean")),
            ]
        )
        rows.append(
            [
                "PSNR (dB), same pairing",
                _numcell(ssim["synthetic"].get("psnr_mean")),
                _numcell(ssim["holdout"].get("psnr_mean")),
            ]
        )
    div = fid.get("ms_ssim_diversity")
    if div:
        rows.append(
            [
                "MS-SSIM between random pairs (diversity; higher = less diverse)",
                _numcell(div["synthetic"]["mean"]),
                _numcell(div["real"]["mean"]),
            ]
        )
    hist = fid.get("intensity_histogram")
    if hist:
        rows.append(
            [
                "intensity histogram, Wasserstein to train",
                _numcell(hist["synthetic"]["wasserstein"]),
                _numcell(hist["holdout"]["wasserstein"]),
            ]
        )
    if rows:
        html += "<h3>Metrics, with the real-vs-real reference</h3>" + _table(
            ["metric", "synthetic", "fresh real data (holdout)"], rows
        )
    paired = audit.get("paired")
    if paired:
        html += _paired(paired)
    described = audit.get("feature_spaces", {}).get("classifier", {})
    if cls.get("computed") and described.get("holdout_balanced_accuracy") is not None:
        html += (
            f'<p class="muted">Classifier space: a small CNN trained {described.get("steps")} steps on the '
            f"{described.get('trained_on')} training slices; balanced accuracy on the holdout "
            f"{_num(described['holdout_balanced_accuracy'])} (evidence that it learned the classes). "
            f"Reference: {esc(cls.get('reference', ''))}.</p>"
        )
    elif cls.get("reason"):
        html += f'<p class="muted">Classifier space not used: {esc(cls["reason"])}.</p>'
    space = audit.get("feature_spaces", {}).get("inception", {})
    if space and not space.get("computed"):
        html += f'<p class="muted">{esc(space.get("reason", ""))}</p>'
    html += (
        '<div class="pair">'
        + _figure(folder, figs.get("synthetic_random"), "Synthetic images drawn at random (not selected)")
        + _figure(folder, figs.get("real_random"), "Real training images drawn at random")
        + "</div>"
    )
    return html


def _paired(paired: Mapping[str, Any]) -> str:
    """pix2pix: each generated slice against the real slice of the same mask."""

    def cell(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
        if not stat:
            return "-"
        low, high = _num(stat["ci_low"], digits), _num(stat["ci_high"], digits)
        return f"{_num(stat['mean'], digits)} ({low} to {high})"

    hold, train = paired["holdout"], paired.get("train") or {}
    rows = [
        ["SSIM with the real slice of the same mask", cell(hold["ssim"]), cell(train.get("ssim"))],
        ["PSNR (dB), same pairing", cell(hold["psnr"], 1), cell(train.get("psnr"), 1)],
    ]
    html = (
        "<h3>Mask-conditioned fidelity (pix2pix)</h3>"
        + _plain(
            "For a mask, the real slice it was drawn from is the right answer. Over holdout masks (patients "
            "never trained on) this measures how well the model renders anatomy it has not seen; over "
            "training masks, how closely it reproduces the patients it was fitted to. A training score far "
            "above the holdout score means a patient's mask alone brings back their slice."
        )
        + _table(["metric (mean, 95% CI)", "holdout masks", "training masks"], rows)
    )
    if paired.get("audited_set"):
        html += _plain(
            f"The synthetic images the other checks audit were {paired['audited_set']}: the case where a "
            "slice drawn for a patient's own mask could bring that patient back."
        )
    gap = paired.get("ssim_gap")
    if gap:
        html += _plain(
            f"SSIM gap, training minus holdout: {_num(gap['mean'])} (95% CI {_num(gap['ci_low'])} to "
            f"{_num(gap['ci_high'])})."
        )
    seg = paired.get("segmentation")
    if seg and "dice" in seg:
        html += (
            "<h3>Segmentation utility of the synthetic (mask, slice) pairs</h3>"
            + _plain(
                f"A small U-Net segments label {seg['label']} on the holdout slices (Dice; {seg['seeds']} "
                f"seeds x {seg['steps']} steps), trained on the real pairs, on the real pairs plus the "
                "generator's slices for the training masks moved by a random flip and shift, or on the real "
                "pairs plus the same moves of the real pairs (the control: what the moves alone give)."
            )
            + _table(
                ["training pairs", "Dice (mean, 95% CI)"],
                [[name, cell(value)] for name, value in seg["dice"].items()],
            )
            + _table(
                ["gain", "Dice difference (mean, 95% CI)"],
                [[name, cell(value)] for name, value in seg["gains"].items()],
            )
        )
    elif seg:
        html += _plain(f"Segmentation utility not measured: {seg.get('skipped')}.")
    return html


def _utility(audit: Mapping[str, Any], folder: Path) -> str:
    util, check = audit.get("utility", {}), audit["checks"]["utility"]
    html = _plain(
        esc(MEANING["utility"][check["verdict"]]) + (f" {esc(check['note'])}" if check.get("note") else "")
    )
    html += _figure_rows(check, with_space=False)
    gains, conditions = util.get("gains") or {}, util.get("conditions") or {}
    shares = (util.get("oracle") or {}).get("balanced_accuracy", {}).get("share_of_oracle")
    if gains:
        rows = []
        for name, gain in gains.items():
            cond = conditions.get(name, {})
            real_g = gain["over_real"]["balanced_accuracy"]
            ctrl = (gain.get("over_control") or {}).get("balanced_accuracy")
            row = [
                esc(name),
                _numcell(cond.get("n_real")),
                _numcell(cond.get("n_synthetic")),
                _numcell((cond.get("balanced_accuracy") or {}).get("mean")),
                _ci(real_g),
                _ci(ctrl) if ctrl else "—",
            ]
            if shares is not None:
                row.append(_numcell(shares.get(name), 2) if name in shares else "—")
            rows.append(row)
        base = conditions.get("real", {}).get("balanced_accuracy", {}).get("mean")
        fraction = util.get("fraction", 1.0)
        html += (
            "<p>Balanced accuracy on the holdout of a classifier trained on real images alone: "
            f"<b>{_num(base)}</b>; {util.get('seeds', '?')} seeds per condition, {util.get('steps', '?')} "
            "steps each, 95% intervals from a bootstrap over holdout patients.</p>"
        )
        if fraction < 1:
            html += _plain(
                f"The classifiers play a small hospital: {fraction:.0%} of the training patients "
                f"({util.get('train_size')} slices). The oracle ({esc(ORACLE)}) adds as many real slices of "
                "the other training patients: what a perfect generator trained on all of them could add."
            )
        else:
            html += _plain(
                "The classifiers train on all the training slices, so no unseen real images are left for an "
                "oracle; a gain near zero may mean there was little to gain (audit with --utility-fraction "
                "0.2 to measure the headroom)."
            )
        header = [
            "condition",
            "real images",
            "synthetic images",
            "balanced accuracy",
            "gain over real alone",
            "gain over re-drawn real (control)",
        ]
        html += _table(header + (["share of the oracle's gain"] if shares is not None else []), rows)
        private = conditions.get(DP_SGD)
        if private:
            cas = (conditions.get(SYNTHETIC_ONLY) or {}).get("balanced_accuracy", {}).get("mean")
            unit = esc(private.get("privacy_unit", "slice"))
            reached = _num(private["balanced_accuracy"]["mean"])
            html += _plain(
                f"The private baseline ({DP_SGD}): the same classifier trained by DP-SGD on the real "
                f"training slices at ε = {private['epsilon']:.3g} per {unit} (what the run spent; the "
                "largest of the hospitals' where their slices are audited together) reaches "
                f"{reached} balanced accuracy. Releasing synthetic images is worth its privacy cost where a "
                "classifier trained on them alone "
                + (f"(here {_num(cas)}) " if cas is not None else "")
                + "comes near it; both are releases under the same guarantee."
            )
    html += _figure(
        folder,
        audit.get("figures", {}).get("utility_gain"),
        "Balanced-accuracy gain against the synthetic-to-real ratio, with 95% intervals",
    )
    return html


def _ci(gain: Mapping[str, Any]) -> str:
    return f'<td class="num">{gain["mean"]:+.3f} ({gain["ci_low"]:+.3f} to {gain["ci_high"]:+.3f})</td>'


# --- the consortium report ------------------------------------------------------------------------


def render_consortium_report(
    consortium: Mapping[str, Any], out: str | Path, *, pdf: bool = True
) -> tuple[Path, Path | None, str | None]:
    """Write consortium.json, its figures, report.html and report.pdf to ``out``.

    ``consortium`` is :func:`fedsynth.audit.federated.combine_shares`'s result: statistics
    only, so nothing here can show a hospital's image.
    """
    out = Path(out)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    ledger = [
        dict(row, hospital=name)
        for name, share in consortium["by_hospital"].items()
        for row in share["privacy"]["ledger"]
    ]
    if ledger:
        figures["epsilon_rounds"] = f"{FIGURES}/epsilon_rounds.png"
        plot_epsilon(ledger, out / figures["epsilon_rounds"])
    figures["dcr_pooled"] = f"{FIGURES}/dcr_pooled.png"
    plot_dcr_counts(
        consortium["pooled_dcr_histograms"],
        consortium["dcr_bin_edges"],
        out / figures["dcr_pooled"],
        "all hospitals pooled",
    )
    curves = {
        f"{hospital}: {attack} (AUC {a['auc']:.2f})": (consortium["roc_fpr_grid"], a["tpr_on_fpr_grid"])
        for hospital, share in consortium["by_hospital"].items()
        for attack, a in share["membership"].items()
    }
    if curves:
        figures["mia_roc"] = f"{FIGURES}/mia_roc.png"
        plot_roc(curves, out / figures["mia_roc"])
    write_json_atomic(out / CONSORTIUM_FILE, dict(consortium, figures=figures))
    document = build_consortium_html(consortium, out, figures)
    html_path = write_html(out / REPORT_HTML, document)
    return (html_path, *_maybe_pdf(out / REPORT_PDF, document, pdf))


def build_consortium_html(consortium: Mapping[str, Any], folder: Path, figures: Mapping[str, str]) -> str:
    shares = consortium["by_hospital"]
    units = {s["privacy_unit"] for s in shares.values()}
    unit = units.pop() if len(units) == 1 else "record"
    totals = consortium["totals"]
    lead = _plain(
        esc(
            "This is the consortium's report. Each hospital audited the shared generator on its own "
            "patients' images, where they are, and sent only aggregate statistics: counts, verdicts, "
            "figures, distance histograms and ROC curves. No image of any hospital is in this report; each "
            "hospital's local report (with its own nearest-neighbour galleries) stays at that hospital. A "
            "check is as bad as its worst hospital."
        )
    )
    per_hospital = _table(
        ["check", "consortium", *shares.keys()],
        [
            [
                f"<b>{esc(CHECK_TITLES.get(name, name))}</b>",
                _light(verdict),
                *[
                    _light(s["checks"][name]["verdict"]) if name in s["checks"] else "<td>—</td>"
                    for s in shares.values()
                ],
            ]
            for name, verdict in consortium["summary"].items()
        ],
    )
    checks_merged: dict[str, dict[str, Any]] = {name: {} for name in consortium["summary"]}
    executive = (
        lead
        + _summary_table(consortium["summary"], checks_merged, unit)
        + "<h3>By hospital</h3>"
        + per_hospital
    )

    scope_rows = [
        [
            esc(name),
            _numcell(s["counts"]["train_images"]),
            _numcell(s["counts"]["train_patients"]),
            _numcell(s["counts"]["holdout_images"]),
            _numcell(s["counts"]["holdout_patients"]),
            _numcell(s["counts"]["synthetic_images"]),
            esc(s["privacy_unit"]),
        ]
        for name, s in shares.items()
    ]
    scope_rows.append(
        [
            "<b>all</b>",
            *[
                _numcell(totals[k])
                for k in (
                    "train_images",
                    "train_patients",
                    "holdout_images",
                    "holdout_patients",
                    "synthetic_images",
                )
            ],
            "",
        ]
    )
    gen = consortium["generator"]
    scope = (
        _table(
            [
                "hospital",
                "train slices",
                "train patients",
                "holdout slices",
                "holdout patients",
                "synthetic images audited",
                "privacy unit",
            ],
            scope_rows,
        )
        + f"<p>Audited generator: SHA-256 <code>{esc(gen['sha256'])}</code> (its checkpoint, or the "
        f"synthetic file audited), round {esc(', '.join(str(r) for r in gen['rounds']))}. Each hospital's "
        "audit is identified by the SHA-256 of its audit.json:</p>"
        + _table(
            ["hospital", "audit.json SHA-256", "classes", "image size"],
            [
                [
                    esc(n),
                    f"<code>{esc(s['provenance']['audit_sha256'])}</code>",
                    esc(", ".join(s["class_names"])),
                    _numcell(s["image_size"]),
                ]
                for n, s in shares.items()
            ],
        )
    )

    ledger_by: dict[str, list[Mapping[str, Any]]] = {
        name: [dict(r, hospital=name) for r in s["privacy"]["ledger"]] for name, s in shares.items()
    }
    formal = (
        _ledger_table(ledger_by)
        + _figure(
            folder,
            figures.get("epsilon_rounds"),
            "ε spent by each hospital after each round (cumulative, log scale)",
        )
        + f"<p>{esc(NOT_COVERED.format(unit=unit))}</p>"
    )

    near_rows = [
        [esc(space), f'<td class="num">{v["count"]:,} of {v["synthetic_images"]:,} ({_num(v["share"])})</td>']
        for space, v in consortium["pooled_near_copies"].items()
    ]
    empirical = _plain(
        esc(
            "Copying and membership inference, measured at each hospital against its own new patients. The "
            "histograms below are the hospitals' histograms added together; distances are divided by each "
            "hospital's median fresh-data distance, so fresh data centres on 1."
        )
    )
    for name, s in shares.items():
        empirical += (
            f"<h3>{esc(name)}</h3>"
            + _figure_rows(s["checks"].get("copying", {}))
            + _figure_rows(s["checks"].get("membership_inference", {}))
        )
    empirical += "<h3>All hospitals</h3>" + _table(["space", "near copies (pooled)"], near_rows)
    empirical += _copy_detector(consortium.get("copy_detector", {}))
    empirical += _figure(
        folder, figures.get("dcr_pooled"), "Distance to the closest record, all hospitals pooled"
    )
    empirical += _figure(
        folder, figures.get("mia_roc"), "Membership-inference ROC per hospital and attack (log axes)"
    )

    fidelity = "".join(
        f"<h3>{esc(n)}</h3>" + _figure_rows(s["checks"].get("fidelity", {})) for n, s in shares.items()
    )
    utility = "".join(
        f"<h3>{esc(n)}</h3>"
        + (
            _figure_rows(s["checks"].get("utility", {}), with_space=False)
            or f'<p class="muted">{esc(s["checks"].get("utility", {}).get("note") or "not measured")}</p>'
        )
        for n, s in shares.items()
    )
    sections = [
        ("Executive summary", executive),
        ("Scope and data", scope),
        (
            "Model and training",
            "<p>The training configuration and software versions are in each hospital's local report and "
            "in the run directory of the coordinator; the generator audited is identified above by its "
            "checkpoint hash.</p>",
        ),
        ("Formal privacy guarantee", formal),
        ("Empirical privacy", empirical),
        (
            "Fidelity",
            _plain(
                esc(
                    "Random sample grids are in each hospital's local report (they show real images, which "
                    "do not leave the hospital)."
                )
            )
            + fidelity,
        ),
        ("Utility", utility),
        (
            "Limitations and residual risk",
            _limitations(unit)
            + "<ul><li>"
            + esc(
                "Distance histograms and ROC curves are aggregates, but at a very small hospital they "
                "describe few patients; a hospital may decline to send its share."
            )
            + "</li></ul>"
            + _appendix(),
        ),
    ]
    return _document(
        "Synthetic image audit: consortium report",
        f"{len(shares)} hospitals, {totals['train_images']:,} training and {totals['holdout_images']:,} "
        "holdout slices audited where they are",
        sections,
    )
