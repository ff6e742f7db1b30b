"""`fedsynth models` and `fedsynth config`: what can be chosen, and every config key."""

from __future__ import annotations

import typer
from rich.table import Table

from fedsynth.commands.common import console
from fedsynth.models import FAMILIES, build_gan, count_parameters, presets
from fedsynth.runs.config import RunConfig

__all__ = ["config", "models"]


def models(size: int = typer.Option(64, help="Image size for the parameter counts.")) -> None:
    """List the GAN families: name, sizes, conditioning, DP support, parameter counts, and the presets."""
    if size not in (32, 64, 128, 256):
        raise typer.BadParameter(f"{size}: use 32, 64, 128 or 256", param_hint="--size")
    table = Table(
        title=f"model families (parameters at {size} px, default width), set with model.name",
        title_justify="left",
    )
    for column in ("name", "sizes", "conditioned on", "DP-SGD", "G params", "D params", "description"):
        table.add_column(column)
    cfg = RunConfig()
    for family in FAMILIES.values():
        model_cfg = cfg.model.model_copy(update={"name": family.name})
        gen, disc = build_gan(model_cfg, image_size=size, num_classes=2)
        table.add_row(
            family.name,
            "/".join(map(str, family.sizes)),
            family.condition,
            family.dp.summary,
            f"{count_parameters(gen):,}",
            f"{count_parameters(disc):,}",
            family.description,
        )
    for name, preset in presets().items():
        preset_cfg = RunConfig.from_overrides({"model.name": name})
        gen, disc = build_gan(preset_cfg.model, image_size=size, num_classes=2)
        family = preset_cfg.model.family
        settings = ", ".join(
            f"{k.split('.', 1)[1]}={v}" for k, v in preset.settings.items() if k != "model.name"
        )
        table.add_row(
            f"{name} (preset)",
            "/".join(map(str, family.sizes)),
            family.condition,
            preset.dp_summary,
            f"{count_parameters(gen):,}",
            f"{count_parameters(disc):,}",
            f"{preset.settings['model.name']} with {settings}",
        )
    console.print(table)


def config() -> None:
    """Print every configuration key with its default, as YAML you can edit and pass to --config."""
    typer.echo("# fedsynth run configuration (defaults). Keys are kebab-case; pass with --config FILE")
    typer.echo("# or override one with --set section.key=value.")
    typer.echo(RunConfig().to_yaml())
