"""`fedsynth report` (re-render an audit's report) and `fedsynth consortium` (the
coordinator's report from the hospitals' shares)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsynth.audit.federated import ShareError, combine_shares, load_share
from fedsynth.audit.pipeline import AUDIT_FILE
from fedsynth.audit.report import (
    CONSORTIUM_FILE,
    render_consortium_report,
    render_report,
)
from fedsynth.commands.common import CommandError, console, user_errors

__all__ = ["consortium", "report"]


@user_errors
def report(
    folder: Path = typer.Argument(..., help="An audit folder (holding audit.json and figures/)."),
    pdf: bool = typer.Option(
        True, "--pdf/--no-pdf", help="Also render report.pdf (WeasyPrint; needs Pango)."
    ),
) -> None:
    """Write an audit folder's report.html and report.pdf again from its audit.json, e.g.
    after installing Pango for the PDF. Nothing is measured again."""
    if not (folder / AUDIT_FILE).is_file():
        raise CommandError(f"{folder}: no {AUDIT_FILE} here (run `fedsynth audit` first)")
    html, pdf_path, why = render_report(folder, pdf=pdf)
    console.print(f"report: {html}" + (f" and {pdf_path}" if pdf_path else ""))
    if why and pdf:
        raise CommandError(f"report.pdf not written: {why}")


@user_errors
def consortium(
    shares: list[Path] = typer.Argument(
        ..., help="share.json files, one per hospital (each written by `fedsynth audit` at that hospital)."
    ),
    out: Path = typer.Option(
        Path("consortium-report"), "--out", "-o", help="Folder for the consortium report."
    ),
    pdf: bool = typer.Option(
        True, "--pdf/--no-pdf", help="Also render report.pdf (WeasyPrint; needs Pango)."
    ),
) -> None:
    """The coordinator's side of the federated audit: combine the hospitals' shares into
    one consortium report (report.html, report.pdf, consortium.json).

    A share holds only aggregate statistics (counts, verdicts, distance histograms, ROC
    curves, ε); each is checked against the wire contract before use, and one that
    carries anything else is refused, naming the file and the key.
    """
    if (out / CONSORTIUM_FILE).exists():
        raise CommandError(
            f"{out} already holds a consortium report; choose another --out (nothing is overwritten)"
        )
    try:
        combined = combine_shares([load_share(path) for path in shares])
    except ShareError as err:
        raise CommandError(str(err)) from None
    html, pdf_path, why = render_consortium_report(combined, out, pdf=pdf)
    verdicts = ", ".join(
        f"{name.replace('_', ' ')} {verdict}" for name, verdict in combined["summary"].items()
    )
    console.print(f"{len(shares)} hospitals: {verdicts}")
    console.print(f"consortium report: {html}" + (f" and {pdf_path}" if pdf_path else ""))
    if why and pdf:
        console.print(f"[yellow]report.pdf not written: {why}[/]")
