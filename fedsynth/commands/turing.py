"""`fedsynth turing-test`: a blinded sheet of real and synthetic slices for an expert, and
`fedsynth turing-test score`: the expert's accuracy against chance."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fedsynth.audit.documents import PdfError
from fedsynth.audit.turing import (
    ANSWERS_FILE,
    PDF_FILE,
    SHEET_FILE,
    TuringError,
    make_test,
    read_answers,
    read_key,
    score,
)
from fedsynth.commands.common import CommandError, console, user_errors
from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.files import write_json_atomic
from fedsynth.data.sliceset import HOLDOUT, SliceSet
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.sample import load_synthetic, sample_images

__all__ = ["turing_test"]

turing_test = typer.Typer(no_args_is_help=True)


@turing_test.callback(invoke_without_command=True)
@user_errors
def make_sheet(
    ctx: typer.Context,
    run_dir: Path = typer.Option(
        None,
        "--run",
        "-r",
        help="Run whose global generator draws the synthetic images (the last round by default).",
    ),
    synthetic: Path = typer.Option(
        None,
        "--synthetic",
        help="Use these synthetic slices (a slice set, e.g. from `fedsynth sample --format npz`) instead of "
        "drawing from --run.",
    ),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="Real slice set (required); real images come from its holdout (patients never trained on) when "
        "it has enough.",
    ),
    n: int = typer.Option(80, "--n", help="Images of each kind: the sheet shows n real and n synthetic."),
    out: Path = typer.Option(
        Path("turing-test"),
        "--out",
        "-o",
        help="Folder for the expert: sheet.html, sheet.pdf and answers.csv.",
    ),
    key: Path = typer.Option(
        None,
        "--key",
        show_default="OUT-key.json beside OUT",
        help="Answer key (JSON), kept by the organiser; must lie outside --out.",
    ),
    seed: int = typer.Option(0, help="Seed of the synthetic draw, the choice of images and the shuffle."),
    round_: str = typer.Option(
        "last",
        "--round",
        help="Round whose generator to use with --run: a number, 'last', or 'best' (the lowest validation "
        "score).",
    ),
) -> None:
    """Visual Turing test: can an expert tell real slices from synthetic ones?

    Without a sub-command, makes the test: n real and n synthetic slices, shuffled and numbered
    T001, T002, ... on a printable sheet (OUT/sheet.html, OUT/sheet.pdf) with a real/synthetic box
    per image, and OUT/answers.csv for the expert to fill in. Nothing on the sheet hints at the
    source; the answer key goes to a separate file.

    Hand the OUT folder to the expert and keep the key; then score the returned answers with
    `fedsynth turing-test score KEY ANSWERS`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if data is None:
        raise CommandError("--data is required: the real slice set to draw real images from")
    if (run_dir is None) == (synthetic is None):
        raise CommandError(
            "give one of --run (a run to draw synthetic images from) or --synthetic (a slice set of them)"
        )
    if round_ not in ("last", "best") and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number, 'last' or 'best'")
    if n < 1:
        raise CommandError("--n must be at least 1")
    key = key if key is not None else out.parent / f"{out.name}-key.json"
    real = SliceSet.load(data)
    provenance: dict[str, object] = {"real_slices": str(data), "real_sha256": file_sha256(data)}
    if synthetic is not None:
        syn_images, syn_labels, where = load_synthetic(synthetic, real.class_names)
        provenance |= where
    else:
        run = RunDir(run_dir)
        classes = tuple(run.load_config().data.classes)
        if classes != real.class_names:
            raise CommandError(f"{data}: classes {real.class_names} differ from the run's {classes}")
        syn_images, labels, _, used_round, conditional = sample_images(
            run, n=n, label=None, round_=round_, seed=seed
        )
        syn_labels = labels if conditional else None
        provenance |= {
            "run": str(run.root),
            "round": used_round,
            "checkpoint_sha256": file_sha256(run.checkpoint(used_round)),
            "synthetic_seed": seed,
        }
    try:
        made = make_test(
            real.images,
            real.labels,
            syn_images,
            syn_labels,
            real.class_names,
            n,
            seed,
            out,
            key,
            provenance,
            real_split=real.split,
        )
    except (TuringError, PdfError) as err:
        raise CommandError(str(err)) from None
    real_from = "the holdout" if made["real_pool"] == HOLDOUT else made["real_pool"]
    console.print(
        f"wrote {out / SHEET_FILE}, {out / PDF_FILE} and {out / ANSWERS_FILE}: {2 * n} images ({n} real from "
        f"{real_from}, {n} synthetic), shuffled"
    )
    console.print(f"key in {key}: keep it; hand only the folder {out} to the expert")


@turing_test.command("score")
@user_errors
def score_answers(
    key_file: Path = typer.Argument(..., metavar="KEY", help="The key written when the test was made."),
    answers_file: Path = typer.Argument(
        ...,
        metavar="ANSWERS",
        help="The expert's answers.csv (id,answer,confidence; answer real or synthetic, or r/s).",
    ),
    json_out: Path = typer.Option(
        None, "--json", help="Also write the scores to this JSON file (must not exist)."
    ),
) -> None:
    """Score an expert's answers against the key.

    KEY is the key written when the test was made; ANSWERS the expert's answers.csv (columns id,
    answer, confidence; answer real or synthetic, or r/s, in any case; confidence 1 to 5 or blank).

    Prints accuracy with its 95% interval, sensitivity (synthetic called synthetic), specificity
    (real called real), accuracy per class and an exact binomial test against guessing (50%). Blank
    answers are listed as missing, not counted as right. Writes nothing unless --json is given.
    """
    if json_out is not None and json_out.exists():
        raise CommandError(f"{json_out} already exists; choose another --json (nothing is overwritten)")
    try:
        key = read_key(key_file)
        rows = read_answers(answers_file)
    except TuringError as err:
        raise CommandError(str(err)) from None
    try:
        result = score(key, rows)
    except TuringError as err:
        raise CommandError(f"{answers_file}: {err}") from None
    _print_scores(result)
    if json_out is not None:
        write_json_atomic(json_out, {"key": str(key_file), "answers": str(answers_file), **result})
        console.print(f"scores in {json_out}")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_scores(result: dict) -> None:
    table = Table(title="visual Turing test", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    low, high = result["accuracy_ci95"]
    table.add_row("accuracy", f"{result['accuracy']:.2f}", f"right / answered; 95% CI {low:.2f}-{high:.2f}")
    table.add_row("answered", f"{result['n_answered']} / {result['n_items']}", f"{result['n_correct']} right")
    table.add_row("sensitivity", _rate(result["sensitivity"]), "synthetic images called synthetic")
    table.add_row("specificity", _rate(result["specificity"]), "real images called real")
    table.add_row(
        "p-value", f"{result['p_value']:.3g}", "two-sided exact binomial test against guessing (0.5)"
    )
    for name, entry in result["per_class"].items():
        table.add_row(
            f"class {name}",
            f"{entry['accuracy']:.2f}",
            f"{entry['n']} answered ({entry['real']} real, {entry['synthetic']} synthetic)",
        )
    for level, entry in result["by_confidence"].items():
        table.add_row(f"confidence {level}", f"{entry['accuracy']:.2f}", f"{entry['n']} answered")
    console.print(table)
    if result["missing"]:
        shown = ", ".join(result["missing"][:20]) + (" ..." if len(result["missing"]) > 20 else "")
        console.print(f"[yellow]{len(result['missing'])} unanswered (not counted): {shown}[/]")
    console.print(result["interpretation"][0].upper() + result["interpretation"][1:])
