"""DP step time / non-DP step time for the default model, side by side in one process.

Both paths are fedsynth's own: ``client.train.train_round`` (plain GAN step) and
``client.dp.train_round_dp`` (DP-SGD on the discriminator's real term: per-sample
gradients, clipping, noise; the fake term and the generator step unclipped). The two
are timed in alternation, ``--repeats`` rounds of ``--steps`` steps each, on the same
data and threads, so machine noise hits both alike; the ratio of medians is reported.

Also reported: epsilon spent by the default run config at sigma = 1 on the same data.

    python benchmarks/dp_overhead.py                  # 64 px, batch 64, 2 threads
    python benchmarks/dp_overhead.py --size 32 --threads 1 --repeats 7

Writes ``benchmarks/results/dp_overhead.{json,md}`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule

if __package__ in (None, ""):  # run as a script: python benchmarks/dp_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BRAIN_MRI, phantom_slices
from fedsynth import __version__
from fedsynth.models.training_dp import train_round_dp
from fedsynth.privacy import PatientSampler, PerSampleClipper, epsilon_for, plan_privacy
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.data.ingest import ingest_image_folder
from fedsynth.models import build_gan

HERE = Path(__file__).resolve().parent


def load_slices(size: int):  # type: ignore[no-untyped-def]
    if BRAIN_MRI.exists():
        slices, _ = ingest_image_folder(BRAIN_MRI, size=size)
        return slices.only("train"), f"brain MRI ({BRAIN_MRI})"
    return phantom_slices(size).only("train"), "phantom CT"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each kind, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser


def measure(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Time both steps in alternation; returns the figures and a Markdown summary."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    slices, data = load_slices(args.size)
    cfg = RunConfig.from_overrides({"data.image-size": args.size, "train.local-steps": args.steps,
                                    "train.batch-size": args.batch, "train.device": args.device,
                                    "dp.noise-multiplier": 1.0})
    n_classes = len(slices.class_names)
    images = torch.from_numpy(slices.as_float()).to(device)
    labels = torch.from_numpy(slices.labels).to(device)
    rng = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    gen_a, disc_a = build_gan(cfg.model, image_size=args.size, num_classes=n_classes)
    gen_a, disc_a = gen_a.to(device), disc_a.to(device)
    opt = make_optimizers(gen_a, disc_a, cfg.train)
    batches = BatchSource(images, labels, batch_size=args.batch, generator=rng)

    torch.manual_seed(0)
    gen_b, disc_b = build_gan(cfg.model, image_size=args.size, num_classes=n_classes)
    gen_b, disc_b = gen_b.to(device), disc_b.to(device)
    opt_dp = make_optimizers(gen_b, disc_b, cfg.train)
    # Brain MRI has no patient ids, so there a slice is the privacy unit.
    unit_ids = slices.patient_ids if slices.privacy_unit == "patient" else np.arange(len(slices)).astype(str)
    units = len(np.unique(unit_ids))
    plan = plan_privacy(cfg.dp, units=units, unit=slices.privacy_unit, batch_size=args.batch, planned_steps=1)
    private = PerSampleClipper(disc_b, max_grad_norm=plan.max_grad_norm)
    sampler = PatientSampler(unit_ids, plan.sample_rate, rng)

    def plain(train_cfg):  # type: ignore[no-untyped-def]
        return train_round(gen_a, disc_a, *opt, batches, train_cfg, generator=rng)

    def dp(train_cfg):  # type: ignore[no-untyped-def]
        return train_round_dp(gen_b, private, *opt_dp, images, labels, sampler, plan, train_cfg,
                              num_classes=n_classes, generator=rng)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(cfg.train)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    warm = cfg.train.model_copy(update={"local_steps": 3})
    plain(warm)
    dp(warm)
    plain_times, dp_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain))
        dp_times.append(timed(dp))
    ratio = statistics.median(dp_times) / statistics.median(plain_times)
    pairwise = [d / p for d, p in zip(dp_times, plain_times, strict=True)]

    # The real term alone: fedsynth's one-pass clipped sum vs materialising every
    # per-sample gradient with Opacus's GradSampleModule and clipping them (what a
    # PrivacyEngine-wrapped discriminator does), same batch, same weights.
    torch.manual_seed(0)
    _, disc_c = build_gan(cfg.model, image_size=args.size, num_classes=n_classes)
    reference = GradSampleModule(copy.deepcopy(disc_c).to(device), loss_reduction="sum")
    clipper = PerSampleClipper(disc_c.to(device), max_grad_norm=1.0)
    idx = torch.randperm(len(images), generator=rng)[: args.batch].to(device)
    xb, yb = images[idx], labels[idx]

    def opacus_real(_cfg) -> None:  # type: ignore[no-untyped-def]
        params = list(reference.parameters())
        for p in params:
            p.grad, p.grad_sample = None, None
        reference(xb, yb).adv.sum().backward()
        flat = torch.cat([p.grad_sample.reshape(len(xb), -1) for p in params], dim=1)
        scale = (1.0 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
        [torch.einsum("i,i...->...", scale, p.grad_sample) for p in params]

    def fedsynth_real(_cfg) -> None:  # type: ignore[no-untyped-def]
        x = xb.clone().requires_grad_(True)
        clipper.backward_real(clipper(x, yb).adv.sum(-1), x)
        clipper.clipped_sum()

    opacus_real(None)
    fedsynth_real(None)
    real_times: dict[str, list[float]] = {"opacus": [], "fedsynth": []}
    for _ in range(args.repeats):
        real_times["opacus"].append(timed(opacus_real) * args.steps)
        real_times["fedsynth"].append(timed(fedsynth_real) * args.steps)

    # Epsilon at sigma = 1 for the default run config on this data (slice-level where
    # the data has no patient ids), to put the step-time figure next to what DP buys.
    default = RunConfig()
    steps = default.federation.rounds * default.train.local_steps
    q = min(1.0, default.train.batch_size / units)
    delta = min(1e-5, 1 / (10 * units))
    spent = {"units": units, "unit": slices.privacy_unit, "rounds": default.federation.rounds,
             "local_steps": default.train.local_steps, "sample_rate": q, "delta": delta,
             "epsilon_rdp": epsilon_for([(1.0, q, steps)], delta),
             "epsilon_prv": epsilon_for([(1.0, q, steps)], delta, "prv")}

    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
               "fedsynth": __version__}
    result = {"benchmark": "dp_overhead", "data": data, "size": args.size, "batch": args.batch,
              "steps_per_round": args.steps, "repeats": args.repeats, "machine": machine,
              "plain_seconds_per_step": plain_times, "dp_seconds_per_step": dp_times,
              "ratio_of_medians": ratio, "ratio_pairwise_min": min(pairwise), "ratio_pairwise_max": max(pairwise),
              "real_term_seconds": real_times, "epsilon_at_sigma_1": spent}
    lines = [
        f"# DP step time / non-DP step time (default cdcgan, {args.size} px, batch {args.batch})", "",
        f"Machine: {machine['cpus']} CPUs, device {machine['device']}, {args.threads} thread(s), "
        f"torch {machine['torch']}. Data: {data}.", "",
        "| | median s/step | min | max |", "| --- | --- | --- | --- |",
        f"| plain GAN step | {statistics.median(plain_times):.4f} | {min(plain_times):.4f} | {max(plain_times):.4f} |",
        f"| DP step (real term per-sample clipped + noised) | {statistics.median(dp_times):.4f} | "
        f"{min(dp_times):.4f} | {max(dp_times):.4f} |", "",
        f"**Ratio of medians: {ratio:.2f}** (pairwise {min(pairwise):.2f}-{max(pairwise):.2f}; goal <= 1.4).", "",
        "Real term only (forward, backward, per-sample clip, sum; batch "
        f"{args.batch}): Opacus GradSampleModule {statistics.median(real_times['opacus']):.4f} s, "
        f"fedsynth PerSampleClipper {statistics.median(real_times['fedsynth']):.4f} s.", "",
        f"At sigma = 1 the default run ({spent['rounds']} rounds x {spent['local_steps']} steps, batch "
        f"{default.train.batch_size}) on all {units} {spent['unit']}s of this data (q = {q:.4f}, delta = {delta:.0e}) "
        f"spends epsilon {spent['epsilon_rdp']:.2f} (RDP) / {spent['epsilon_prv']:.2f} (PRV) per {spent['unit']}.",
    ]
    return result, lines


def main() -> None:
    args = parser().parse_args()
    result, lines = measure(args)
    machine = result["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"dp_overhead-{machine['device'].replace(' ', '_')}" if machine["device"] != "cpu" else "dp_overhead"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
