"""`fedsynth models` and `fedsynth config`: what can be chosen, and every config key."""

from __future__ import annotations

import typer
from rich.table import Table

from ..shared.config import RunConfig
from ..shared.models import MODEL_FAMILIES, build_gan, count_parameters
from .common import console

__all__ = ["config", "models"]


def models(size: int = typer.Option(64, help="Image size for the parameter counts.")) -> None:
    """List the GAN families: name, sizes, conditioning, parameter counts."""
    if size not in (32, 64, 128):
        raise typer.BadParameter(f"{size}: use 32, 64 or 128", param_hint="--size")
    table = Table(title=f"model families (parameters at {size} px, default width), set with model.name",
                  title_justify="left")
    for column in ("name", "sizes", "conditional", "G params", "D params", "description"):
        table.add_column(column)
    cfg = RunConfig()
    for family in MODEL_FAMILIES.values():
        model_cfg = cfg.model.model_copy(update={"name": family.name})
        gen, disc = build_gan(model_cfg, image_size=size, num_classes=2)
        table.add_row(family.name, "/".join(map(str, family.sizes)), "yes" if family.conditional else "no",
                      f"{count_parameters(gen):,}", f"{count_parameters(disc):,}", family.description)
    console.print(table)


def config() -> None:
    """Print every configuration key with its default, as YAML you can edit and pass to --config."""
    typer.echo("# fedsynth run configuration (defaults). Keys are kebab-case; pass with --config FILE")
    typer.echo("# or override one with --set section.key=value.")
    typer.echo(RunConfig().to_yaml())
