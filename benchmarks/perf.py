"""Performance: trainer overhead, DP overhead, federation overhead, peak memory, audit scaling.

Each comparison is measured side by side in one process (alternating, repeated) and
reported as a ratio of medians with the spread, because these machines are noisy.
Called by ``python -m benchmarks.run``; each function returns (figures, Markdown lines).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsynth.client.hospital import HospitalSite, run_local_round
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.core.weights import exchanged_state
from fedsynth.runs.rundir import RunDir
from fedsynth.data.sliceset import SliceSet

from . import audit_scaling, dp_overhead
from .common import ENV, FEDSYNTH, run, spread

GOALS = {"trainer": 1.05, "dp": 1.4, "federation": 1.15, "audit_50k_s": 600.0, "memory_gb": 1.5}


# --- trainer overhead -------------------------------------------------------------------------------


def _bare_loop(gen, disc, opt_g, opt_d, images, labels, steps: int, batch: int, g: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    """The same GAN step written as a plain PyTorch loop: hinge loss, AC head, no bookkeeping."""
    n = len(images)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        real, y = images[idx], labels[idx]
        z = torch.randn(batch, gen.latent_dim, generator=g)
        with torch.no_grad():
            fake = gen(z, y)
        opt_d.zero_grad()
        out_r, out_f = disc(real, y), disc(fake, y)
        loss_d = F.relu(1 - out_r.adv).mean() + F.relu(1 + out_f.adv).mean()
        if out_r.class_logits is not None:
            loss_d = loss_d + F.cross_entropy(out_r.class_logits, y)
        loss_d.backward()
        opt_d.step()
        disc.requires_grad_(False)
        opt_g.zero_grad()
        out_g = disc(gen(torch.randn(batch, gen.latent_dim, generator=g), y), y)
        loss_g = -out_g.adv.mean()
        if out_g.class_logits is not None:
            loss_g = loss_g + F.cross_entropy(out_g.class_logits, y)
        loss_g.backward()
        opt_g.step()
        disc.requires_grad_(True)


def trainer_overhead(data: Path, *, steps: int, repeats: int, batch: int, threads: int) -> tuple[dict, list[str]]:
    """fedsynth's training step (``train_round``) and a hospital's whole local round
    (``run_local_round``: load slices, restore state, train, save state) vs a bare loop."""
    torch.set_num_threads(threads)
    slices = SliceSet.load(data).only("train")
    size = slices.image_size
    cfg = RunConfig.from_overrides({"data.image-size": size, "data.class-names": ",".join(slices.class_names),
                                    "train.local-steps": steps, "train.batch-size": batch, "train.device": "cpu",
                                    "train.threads": threads})
    images = torch.from_numpy(slices.as_float())
    labels = torch.from_numpy(slices.labels)
    k = len(slices.class_names)

    def fresh():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        gen, disc = build_gan(cfg.model, image_size=size, num_classes=k)
        return gen, disc, *make_optimizers(gen, disc, cfg.train)

    g = torch.Generator().manual_seed(0)
    bare = fresh()
    ours = fresh()
    batches = BatchSource(images, labels, batch_size=batch, generator=g)
    work = Path(tempfile.mkdtemp(prefix="fedsynth-bench-trainer-"))
    site = HospitalSite("bench", data, work / "state")
    global_g = {k_: v.clone() for k_, v in exchanged_state(fresh()[0]).items()}

    def t_bare() -> None:
        _bare_loop(*bare, images, labels, steps, batch, g)

    def t_train_round() -> None:
        train_round(*ours[:2], *ours[2:], batches, cfg.train, generator=g)

    def t_local_round() -> None:
        run_local_round(site, cfg, server_round=1, global_generator=global_g)

    kinds = {"bare PyTorch loop": t_bare, "fedsynth train_round": t_train_round,
             "fedsynth run_local_round (whole local round)": t_local_round}
    for fn in kinds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    order = list(kinds.items())
    for r in range(repeats):
        for name, fn in order[r % len(order):] + order[: r % len(order)]:  # rotated: no fixed-order bias
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["bare PyTorch loop"])
    ratios = {name: statistics.median(v) / base for name, v in times.items()}
    pairwise = {name: [a / b for a, b in zip(v, times["bare PyTorch loop"], strict=True)] for name, v in times.items()}
    result = {"image_size": size, "batch": batch, "steps": steps, "repeats": repeats, "threads": threads,
              "seconds_per_step": {n: spread(v) for n, v in times.items()}, "ratio_to_bare": ratios,
              "pairwise_ratio": {n: spread(v) for n, v in pairwise.items()}, "goal": GOALS["trainer"]}
    lines = [f"### Trainer overhead ({size} px, batch {batch}, {steps} steps x {repeats} alternating repeats, "
             f"{threads} thread(s))", "",
             "| loop | median s/step | min | max | / bare (median) | pairwise range |", "| --- | --- | --- | --- | --- | --- |"]
    for name, v in times.items():
        p = pairwise[name]
        lines.append(f"| {name} | {statistics.median(v):.4f} | {min(v):.4f} | {max(v):.4f} | "
                     f"{ratios[name]:.3f} | {min(p):.2f}-{max(p):.2f} |")
    lines += ["", f"Goal: `train_round` / bare <= {GOALS['trainer']}."]
    return result, lines


# --- DP overhead ------------------------------------------------------------------------------------


def dp_step_overhead(*, size: int, steps: int, repeats: int, batch: int, threads: int, out: Path) -> tuple[dict, list[str]]:
    args = dp_overhead.parser().parse_args([
        "--size", str(size), "--steps", str(steps), "--repeats", str(repeats), "--batch", str(batch),
        "--threads", str(threads), "--device", "cpu", "--out", str(out)])
    result, lines = dp_overhead.measure(args)
    result["goal"] = GOALS["dp"]
    return result, ["### DP overhead", "", *lines[2:]]


# --- federation overhead ----------------------------------------------------------------------------


def federation_overhead(data: Path, work: Path, *, hospitals: int, rounds: int, steps: int, batch: int,
                        threads: int) -> tuple[dict, list[str]]:
    """Flower simulation (hospitals one at a time, each with all threads) vs the same local
    rounds called in one process without Flower, same config and data."""
    sim = work / "federation-sim"
    shutil.rmtree(sim, ignore_errors=True)
    sets = ["--set", f"train.batch-size={batch}", "--set", f"simulation.client-cpus={threads}",
            "--set", "simulation.parallel-hospitals=1", "--set", f"federation.min-hospitals={hospitals}"]
    command_wall = run([FEDSYNTH, "simulate", "--data", str(data), "--hospitals", str(hospitals), "--partition", "iid",
                        "--rounds", str(rounds), "--local-steps", str(steps), "--out", str(sim), *sets],
                       log=work / "logs" / "federation-sim.log")
    records = RunDir(sim).read_rounds()
    rounds_wall = sum(r["seconds"] for r in records)
    train_sum = sum(m["seconds"] for r in records for m in r["hospitals"].values())
    # The same hospitals' local rounds, called one after another in a fresh process.
    code = _INPROCESS.format(sim=str(sim), rounds=rounds, work=str(work / "federation-inprocess"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"in-process federation baseline failed:\n{proc.stderr[-3000:]}")
    inprocess_wall = time.perf_counter() - start
    inproc = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"hospitals": hospitals, "rounds": rounds, "local_steps": steps, "batch": batch, "threads": threads,
              "simulate_command_seconds": command_wall, "simulation_rounds_seconds": rounds_wall,
              "local_training_seconds_sum": train_sum, "inprocess_training_seconds": inproc["training"],
              "inprocess_local_rounds_seconds": inproc["local_rounds"], "inprocess_process_seconds": inprocess_wall,
              "ratio_rounds_to_training": rounds_wall / train_sum,
              "ratio_command_to_training": command_wall / train_sum,
              "ratio_command_to_inprocess_process": command_wall / inprocess_wall, "goal": GOALS["federation"]}
    lines = [f"### Federation overhead ({hospitals} hospitals x {rounds} rounds x {steps} steps, batch {batch}, "
             f"{threads} threads, hospitals one at a time)", "",
             "| | Flower simulation | same rounds in one process, no Flower |", "| --- | --- | --- |",
             f"| training loops (sum over hospitals and rounds) | {train_sum:.1f} s | {inproc['training']:.1f} s |",
             f"| local rounds (loops + loading, state, sending) / round wall times | {rounds_wall:.1f} s | "
             f"{inproc['local_rounds']:.1f} s |",
             f"| whole command / whole process | {command_wall:.1f} s | {inprocess_wall:.1f} s |", "",
             f"Round wall / training loops: **{rounds_wall / train_sum:.3f}** (goal <= {GOALS['federation']}); "
             f"whole command (start-up, checkpoints, grids, curves) / training loops: {command_wall / train_sum:.2f}; "
             f"whole command / whole no-Flower process: {command_wall / inprocess_wall:.2f}."]
    return result, lines


_INPROCESS = """
import json, time, shutil
from pathlib import Path
from fedsynth.client.hospital import HospitalSite, run_local_round
from fedsynth.core.checkpoint import load_checkpoint
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.core.weights import split_model
sim = RunDir({sim!r})
cfg = RunConfig.from_yaml(sim.config_path)
work = Path({work!r}); shutil.rmtree(work, ignore_errors=True)
names = sorted(p.name for p in sim.hospitals_dir.iterdir() if p.is_dir())
weights = split_model(load_checkpoint(sim.checkpoint(0))[0])[0]
rounds_wall = loop = 0.0
for rnd in range(1, {rounds} + 1):
    updates = []
    for name in names:
        site = HospitalSite(name, sim.hospitals.slices(name), work / name)
        t = time.perf_counter()
        res = run_local_round(site, cfg, server_round=rnd, global_generator=weights)
        rounds_wall += time.perf_counter() - t
        loop += res.stats.seconds
        updates.append((res.generator, res.stats.num_examples))
    total = sum(n for _, n in updates)
    weights = {{k: sum(u[k] * (n / total) for u, n in updates) for k in weights}}
print(json.dumps({{"local_rounds": rounds_wall, "training": loop}}))
"""


# --- peak memory --------------------------------------------------------------------------------------

_MEMORY = """
import json, sys
import flwr  # a ClientApp process imports Flower too
from pathlib import Path
from fedsynth.client.hospital import HospitalSite, run_local_round
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.core.weights import exchanged_state
from fedsynth.data.sliceset import SliceSet
data, state, steps, dp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "dp"
s = SliceSet.load(data)
def hwm():  # this process's peak resident memory, kB (ru_maxrss would carry the parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
over = {{"data.image-size": s.image_size, "data.class-names": ",".join(s.class_names), "train.local-steps": steps,
        "train.threads": {threads}}}
if dp:
    over["dp.target-epsilon"] = 10.0
cfg = RunConfig.from_overrides(over)
gen, _ = build_gan(cfg.model, image_size=s.image_size, num_classes=len(s.class_names))
res = run_local_round(HospitalSite("memory", Path(data), Path(state)), cfg, server_round=1,
                      global_generator=exchanged_state(gen))
if res.stats is None:
    sys.exit(f"the probe's hospital did not train: {{res.declined}}")
after = hwm()
print(json.dumps({{"imports_kb": before, "peak_kb": after, "train_slices": int((s.split == "train").sum())}}))
"""


def peak_memory(data: Path, work: Path, *, hospitals: int, steps: int, threads: int) -> tuple[dict, list[str]]:
    """Peak resident memory of one hospital's local round in its own process (as a
    ClientApp runs it), with and without DP, on a 1/``hospitals`` share of the slices."""
    slices = SliceSet.load(data)
    share = slices.subset(np.arange(len(slices)) % hospitals == 0)
    path = share.save(work / "memory" / "hospital.npz")
    rows = {}
    for kind in ("plain", "dp"):
        shutil.rmtree(work / "memory" / f"state-{kind}", ignore_errors=True)  # a fresh privacy ledger each time
        proc = subprocess.run([sys.executable, "-c", _MEMORY.format(threads=threads), str(path),
                               str(work / "memory" / f"state-{kind}"), str(steps), kind],
                              env=ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"peak-memory probe failed:\n{proc.stderr[-3000:]}")
        rows[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = {k: v["peak_kb"] / 1024**2 for k, v in rows.items()}
    result = {"image_size": slices.image_size, "hospital_train_slices": rows["plain"]["train_slices"],
              "steps": steps, "peak_gb": gb, "imports_gb": rows["plain"]["imports_kb"] / 1024**2,
              "goal_gb": GOALS["memory_gb"]}
    lines = [f"### Peak memory of one hospital's local round ({slices.image_size} px, "
             f"{rows['plain']['train_slices']} training slices, {steps} steps, own process)", "",
             "| | peak RSS (GB) |", "| --- | --- |",
             f"| Python + torch + Flower + fedsynth imported, slices loaded | {result['imports_gb']:.2f} |",
             f"| local round, plain | {gb['plain']:.2f} |", f"| local round, DP-SGD (target epsilon 10) | {gb['dp']:.2f} |",
             "", f"Goal: <= {GOALS['memory_gb']} GB per hospital."]
    return result, lines


# --- audit scaling ------------------------------------------------------------------------------------


def audit_scale(sizes: list[int], *, image_size: int, threads: int, full_audit_max: int,
                work: Path, steps: int = 0, encoder_steps: int = 0) -> tuple[dict, list[str]]:
    """The copy detector's search (and the whole audit, utility study aside) at each size,
    n synthetic x n training images and a holdout of n / 4 (at most 10,000). ``steps`` and
    ``encoder_steps`` (0: the audit's defaults) train the audit's classifier and encoder
    for that many steps."""
    from fedsynth.audit.pipeline import AuditInputs, AuditOptions, run_audit

    torch.set_num_threads(threads)
    base, base_labels, what = audit_scaling.base_images(image_size)
    rows = []
    for n in sizes:
        data = audit_scaling.sets(base, n, holdout=min(10_000, max(10, n // 4)))
        (train, train_from), (holdout, holdout_from), (synthetic, synthetic_from) = data.values()
        row: dict[str, Any] = {"n": n, "holdout": len(holdout), **audit_scaling.search_times(synthetic, train)}
        if n <= full_audit_max:
            # the disguised versions of one real slice are one patient (so the train subsample
            # of the share test and the holdout are exchangeable)
            inputs = AuditInputs(
                train_images=train, train_labels=base_labels[train_from], train_patients=train_from.astype(str),
                holdout_images=holdout, holdout_labels=base_labels[holdout_from],
                holdout_patients=holdout_from.astype(str),
                synthetic_images=synthetic, synthetic_labels=base_labels[synthetic_from],
                class_names=tuple(f"class-{c}" for c in range(int(base_labels.max()) + 1)))
            start = time.perf_counter()
            options = AuditOptions(utility=False, threads=threads)
            if steps:
                options.classifier_steps = steps
            if encoder_steps:
                options.encoder_steps = encoder_steps
            audit = run_audit(inputs, work / f"audit-{n}", options)
            row["full_audit_without_utility_s"] = time.perf_counter() - start
            row["audit_steps_s"] = audit["seconds"]
        rows.append(row)
    result = {"image_size": image_size, "threads": threads, "images": what, "rows": rows, "classifier_steps": steps or "default",
              "goal_50k_audit_s": GOALS["audit_50k_s"]}
    lines = [f"### Audit scaling ({image_size} px, n synthetic x n training images, {threads} threads; {what}, "
             "disjoint parts grown under light random disguises, the versions of one slice one patient)", "",
             "| n | holdout | copy detector: index both sets | copy detector: every synthetic image to train | "
             "whole audit, no utility | of which memorization (both spaces) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        full = f"{r['full_audit_without_utility_s']:.0f} s" if "full_audit_without_utility_s" in r else "not run"
        memo = f"{r['audit_steps_s']['memorization']:.0f} s" if "audit_steps_s" in r else "—"
        lines.append(f"| {r['n']:,} | {r['holdout']:,} | {r['index_both_sets_s']:.1f} s | {r['copy_search_s']:.1f} s | "
                     f"{full} | {memo} |")
    lines += ["", f"Goal: the whole audit of 50k x 50k, memorization included, < {GOALS['audit_50k_s']:.0f} s. The "
              "utility study is left out: its cost is set by the classifiers' steps, not by n. The sets are a timing "
              "load (about 1,000 slices, each under some 40 disguises), not a calibration: the audit's verdicts on "
              "them mean nothing (the copy detector's calibration is benchmarks/copy_detection.py)."]
    return result, lines

