"""What the server keeps after each round: checkpoint, sample grid, metrics line, curves."""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from fedsynth.core.checkpoint import load_checkpoint, save_checkpoint
from fedsynth.core.plotting import pyplot
from fedsynth.core.weights import load_weights, model_tensors, sampling_state, split_model
from fedsynth.models import EMBEDDING, build_networks
from fedsynth.models.networks import GeneratorNet
from fedsynth.privacy import epsilon_for
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.generator import load_warm_start

__all__ = [
    "build_global_models",
    "plot_curves",
    "record_client_privacy",
    "record_privacy",
    "record_round",
    "restore_round",
    "start_average",
    "update_average",
]

log = logging.getLogger(__name__)


def build_global_models(cfg: RunConfig) -> tuple[GeneratorNet, nn.Module | None]:
    """The initial global generator (and discriminator, if aggregated): seeded, or the
    warm start's weights (``train.init-from``)."""
    torch.manual_seed(cfg.train.seed)
    gen, built = build_networks(cfg)
    disc = built if cfg.federation.aggregate_discriminator else None
    load_warm_start(cfg, gen, disc)
    return gen, disc


def restore_round(
    run: RunDir, round_: int, gen: GeneratorNet, disc: nn.Module | None, average: GeneratorNet | None = None
) -> None:
    """Load a round's checkpoint into the global models, and the generator's running
    average where the checkpoint holds one (else the average starts from the generator)."""
    tensors, _ = load_checkpoint(run.checkpoint(round_))
    gen_state, disc_state = split_model(tensors)
    load_weights(gen, gen_state)
    if disc is not None and disc_state:
        load_weights(disc, disc_state)
    if average is not None:
        load_weights(average, sampling_state(tensors))


def start_average(cfg: RunConfig, gen: GeneratorNet) -> GeneratorNet | None:
    """The generator's running average over rounds (``federation.generator-average``),
    starting as a copy of the global generator; None when it is off, or for a family
    fitted once to its hospitals' releases (dp-merf: one round, nothing to average)."""
    if cfg.federation.generator_average <= 0 or cfg.model.family.federation == EMBEDDING:
        return None
    return copy.deepcopy(gen)


@torch.no_grad()
def update_average(average: GeneratorNet, gen: GeneratorNet, round_: int, decay: float) -> None:
    """Fold round ``round_``'s global generator into the running average: an exponential
    moving average with ``decay`` per round, after a ramp (decay (r - 1) / (r + 1) in round
    r, while that is smaller) that makes it, over the first rounds, the average of every
    round so far weighted by round number: a short run is not dragged back to its first,
    untrained rounds. BatchNorm's running statistics are averaged like the weights; its
    step counters are the generator's."""
    beta = min(decay, (round_ - 1) / (round_ + 1))
    current = gen.state_dict()
    for key, value in average.state_dict().items():
        if value.is_floating_point():
            value.mul_(beta).add_(current[key], alpha=1 - beta)
        else:
            value.copy_(current[key])


def record_round(
    run: RunDir,
    cfg: RunConfig,
    round_: int,
    gen: GeneratorNet,
    disc: nn.Module | None,
    *,
    report: dict[str, Any],
    seconds: float,
    average: GeneratorNet | None = None,
) -> dict[str, Any]:
    """Write the round's checkpoint (atomically), its sample grid (drawn from the running
    average where there is one: what sampling will draw from) and its metrics line.

    The checkpoint is written first: a round counts as done once its checkpoint exists,
    and ``rounds.jsonl`` is appended only after that, so a crash in between loses no
    weights and resuming rewrites nothing already trusted.
    """
    checkpoint = save_checkpoint(
        run.checkpoint(round_),
        model_tensors(gen, disc, average),
        {
            "round": str(round_),
            "model": cfg.model.name,
            "image-size": str(cfg.data.image_size),
            "class-names": cfg.data.class_names,
        },
    )
    grid = cfg.model.family.round_grid(
        average if average is not None else gen, cfg, run.grid(round_), title=f"round {round_}"
    )
    record = {
        "round": round_,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "checkpoint": str(checkpoint.relative_to(run.root)),
        "grid": str(grid.relative_to(run.root)) if grid is not None else None,
        **report,
    }
    if round_ > 0:
        run.append_round(record)
        plot_curves(run)
    return record


def record_privacy(
    run: RunDir, round_: int, report: Any, *, warm_start: dict[str, Any] | None = None
) -> None:
    """Append each hospital's privacy spending this round to the ledger (``privacy.jsonl``).

    Written for every reply that carried DP figures, including hospitals that declined
    the round for budget, before the round's checkpoint: spent privacy is recorded even
    if the round itself is lost. ``warm_start``: the checkpoint the generator started from
    (``train.init-from``), declared public and charged nothing, named on every line.
    """
    for hospital, spent in sorted(report.privacy.items()):
        # NaN / inf (the accountant could not bound it: PRV at very large epsilon) is written as null.
        num = spent.get

        run.append_privacy(
            {
                "round": round_,
                "hospital": hospital,
                "trained": hospital in report.hospitals,
                "declined": next((d["reason"] for d in report.declined if d["hospital"] == hospital), None),
                "privacy_unit": spent.get("dp-unit"),
                "units": num("dp-units"),
                "noise_multiplier": num("dp-noise-multiplier"),
                "sample_rate": num("dp-sample-rate"),
                "max_grad_norm": num("dp-max-grad-norm"),
                "steps": num("dp-steps"),
                "delta": num("dp-delta"),
                "epsilon_rdp": num("dp-epsilon"),
                "epsilon_prv": num("dp-epsilon-prv"),
                "target_epsilon": num("dp-target-epsilon") or None,
                # a one-shot release (dp-merf): the noise's std and the release's L2 sensitivity
                **(
                    {"noise_std": num("dp-noise-std"), "sensitivity": num("dp-sensitivity")}
                    if "dp-noise-std" in spent
                    else {}
                ),
                **({"warm_start": warm_start} if warm_start else {}),
            }
        )


def record_client_privacy(run: RunDir, cfg: RunConfig, round_: int, report: Any) -> None:
    """Append the round's client-level DP release to ``client_privacy.jsonl`` with the
    epsilon spent so far (per hospital: whether a hospital took part at all).

    Every round is one Gaussian mechanism with noise multiplier sigma on the clipped sum,
    without sampling amplification (all hospitals are asked each round), accounted by
    Opacus's RDP accountant over the rounds released so far, resumed runs included.
    """
    fed = cfg.federation
    released = [r for r in run.read_client_privacy() if r["round"] < round_]
    history = [(r["noise_multiplier"], 1.0, 1) for r in released] + [(fed.client_dp_noise_multiplier, 1.0, 1)]
    run.append_client_privacy(
        {
            "round": round_,
            "privacy_unit": "hospital",
            **report.client_dp,
            "releases": len(history),
            "delta": fed.client_dp_delta,
            "epsilon_rdp": epsilon_for(history, fed.client_dp_delta),
        }
    )


def plot_curves(run: RunDir) -> None:
    """``curves.png``: discriminator and generator loss per hospital over rounds; the
    validation Fréchet distance per hospital and overall, with the best round marked,
    when the hospitals score one; epsilon spent per hospital for DP runs."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rounds = run.read_rounds()
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def add(key: str, name: str, round_: int, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            series.setdefault(key, {}).setdefault(name, []).append((round_, float(value)))

    for record in rounds:
        for name, metrics in record.get("hospitals", {}).items():
            for key in ("d-loss", "g-loss"):
                add(key, name, record["round"], metrics.get(key))
        validation = record.get("validation") or {}
        for name, score in validation.get("hospitals", {}).items():
            add("val-fd", name, record["round"], score.get("fd"))
        add("val-fd", "all (weighted)", record["round"], validation.get("fd"))
    for row in run.read_privacy():
        add("epsilon", str(row.get("hospital")), int(row.get("round", 0)), row.get("epsilon_rdp"))
    if not series.get("g-loss"):
        return
    panels = [("d-loss", "discriminator loss"), ("g-loss", "generator loss")]
    if series.get("val-fd"):
        panels.append(("val-fd", "validation FD (pixels; lower is better)"))
    if series.get("epsilon"):
        panels.append(("epsilon", "epsilon spent (RDP)"))
    # One colour per hospital in every panel (a DP hospital has no D loss to show).
    names = sorted({name for per_key in series.values() for name in per_key} - {"all (weighted)"})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    colours["all (weighted)"] = "black"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, points in sorted(series.get(key, {}).items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                marker="o",
                label=name,
                color=colours[name],
                linewidth=2.2 if name == "all (weighted)" else 1.2,
            )
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key != "d-loss" and series.get(key):
            ax.legend(fontsize=7)
    best = run.best_round()
    if best is not None and "val-fd" in series:
        ax = axes[[k for k, _ in panels].index("val-fd")]
        ax.axvline(best, color="0.4", linestyle="--", linewidth=1)
        ax.text(best, ax.get_ylim()[0], f" best: round {best}", fontsize=8, va="bottom", color="0.3")
    withheld = sorted(set(series.get("g-loss", {})) - set(series.get("d-loss", {})))
    if withheld:
        axes[0].text(
            0.02,
            0.02,
            f"withheld under DP: {', '.join(withheld)}",
            transform=axes[0].transAxes,
            fontsize=8,
            color="0.35",
        )
    tmp = run.curves_path.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(run.curves_path)
