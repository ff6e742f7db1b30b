"""`fedsynth models` and `fedsynth config`: what can be chosen, and every config key."""

from __future__ import annotations

from typing import Any

import typer
from rich import box
from rich.table import Table

from fedsynth.commands.common import FORMAT_HELP, OutputFormat, console, echo_json
from fedsynth.models import FAMILIES, build_gan, count_parameters, presets
from fedsynth.runs.config import RunConfig

__all__ = ["config", "model_rows", "models"]


def _dp_short(ok: bool, summary: str) -> str:
    return ("yes" if summary == "yes" else "with limits") if ok else "no"


def _row(
    name: str, kind: str, model_cfg: Any, *, size: int, dp_ok: bool, dp_summary: str, description: str
) -> dict[str, Any]:
    gen, disc = build_gan(model_cfg, image_size=size, num_classes=2)
    family = model_cfg.family
    return {
        "name": name,
        "kind": kind,
        "sizes": list(family.sizes),
        "conditioned_on": family.condition,
        "dp_sgd": dp_ok,
        "dp_sgd_summary": dp_summary,
        "g_params": count_parameters(gen),
        "d_params": count_parameters(disc),
        "description": description,
    }


def model_rows(size: int) -> list[dict[str, Any]]:
    """One row per family and preset: what ``fedsynth models`` lists."""
    cfg = RunConfig()
    rows = [
        _row(
            f.name,
            "family",
            cfg.model.model_copy(update={"name": f.name}),
            size=size,
            dp_ok=f.dp.ok,
            dp_summary=f.dp.summary,
            description=f.description,
        )
        for f in FAMILIES.values()
    ]
    for name, preset in presets().items():
        settings = ", ".join(
            f"{k.split('.', 1)[1]}={v}" for k, v in preset.settings.items() if k != "model.name"
        )
        rows.append(
            _row(
                name,
                "preset",
                RunConfig.from_overrides({"model.name": name}).model,
                size=size,
                dp_ok=preset.dp_ok,
                dp_summary=preset.dp_summary,
                description=f"{preset.settings['model.name']} with {settings}",
            )
        )
    return rows


def models(
    size: int = typer.Option(64, help="Image size for the parameter counts."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help=FORMAT_HELP),
) -> None:
    """List the GAN families and presets: name, conditioning, DP support, parameter counts, description.

    The table keeps every name whole at 80 columns (a terminal's default, and a pipe's);
    the descriptions and the DP-SGD conditions follow it as text.
    """
    if size not in (32, 64, 128, 256):
        raise typer.BadParameter(f"{size}: use 32, 64, 128 or 256", param_hint="--size")
    rows = model_rows(size)
    if output_format is OutputFormat.json:
        echo_json({"image_size": size, "models": rows})
        return
    names = [r["name"] + (" (preset)" if r["kind"] == "preset" else "") for r in rows]
    table = Table(
        title=f"model families at {size} px (default width), set with model.name",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("name", no_wrap=True, min_width=max(map(len, names)))
    table.add_column("conditioned on")
    table.add_column("DP-SGD")
    table.add_column("G params", justify="right", no_wrap=True)
    table.add_column("D params", justify="right", no_wrap=True)
    for name, r in zip(names, rows, strict=True):
        table.add_row(
            name,
            r["conditioned_on"],
            _dp_short(r["dp_sgd"], r["dp_sgd_summary"]),
            f"{r['g_params']:,}",
            f"{r['d_params']:,}",
        )
    console.print(table)
    for name, r in zip(names, rows, strict=True):
        sizes = "/".join(map(str, r["sizes"]))
        console.print(
            f"[bold]{name}[/]: {r['description']}. Sizes {sizes} px. DP-SGD: {r['dp_sgd_summary']}.",
            highlight=False,
        )


def config() -> None:
    """Print every configuration key with its default, as YAML you can edit and pass to --config."""
    typer.echo("# fedsynth run configuration (defaults). Keys are kebab-case; pass with --config FILE")
    typer.echo("# or override one with --set section.key=value.")
    typer.echo(RunConfig().to_yaml())
