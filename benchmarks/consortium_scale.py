"""A consortium at scale: 3, 10 and 30 simulated hospitals on one machine.

    python -m benchmarks.consortium_scale                 # about 9 minutes on 2 CPU cores
    python -m benchmarks.consortium_scale --hospitals 3,10 --rounds 2   # a shorter look

The de-duplicated brain MRI slices at 32 px are split by ``fedsynth simulate`` into N
hospitals (Dirichlet 0.5 over classes, then whole patients moved from the largest
hospitals until each has 20 training slices: ``dirichlet:0.5,min=20``; hospitals hold
from 20 to a few hundred slices), and the default recipe trains ``--rounds`` rounds of ``--local-steps``
steps (validation scores off, so a round is training and aggregation only). Per N:

- round wall time (``rounds.jsonl``), the server's wait for the replies and its
  aggregation time (the round's ``server`` timings);
- the hospitals' own training time (their ``seconds``), summed, and the overhead: the
  round's wall time minus that sum spread over the cores (what perfect packing would take);
- peak memory of the whole simulation: the resident memory of every process of the
  command (Flower's, Ray's, the hospitals' workers), sampled every 0.5 s and summed.

Then, at ``--churn`` sizes (10 and 30), the same run as a real consortium goes: half the
hospitals asked each round (``federation.fraction-train=0.5``), two slow sites that answer
after ``federation.round-timeout`` (``simulation.slow``) and three that join at round 2
(``simulation.join``). Per round: how many were asked, trained, gave no reply in time,
declined (not joined yet), and the round's seconds.

Writes ``OUT/consortium_scale.{json,md}`` and ``OUT/consortium_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedsynth.core.device import available_cores
from fedsynth.runs.rundir import RunDir

from .common import ENV, FEDSYNTH, HERE, machine, machine_line, prepare_brain, progress, write


def run_sampled(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak summed RSS of its process tree in GB)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total / 1e9)
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started, peak


PARTITION = "dirichlet:0.5,min=20"


# the churn runs: who is slow, who joins late, and how long the server waits
SLOW, LATE, TIMEOUT, DELAY = ("hospital-a", "hospital-b"), ("hospital-c", "hospital-d", "hospital-e"), 60, 90
CHURN = ["--set", "federation.fraction-train=0.5", "--set", f"federation.round-timeout={TIMEOUT}",
         "--set", "simulation.slow=" + ",".join(f"{h}={DELAY}" for h in SLOW),
         "--set", "simulation.join=" + ",".join(f"{h}=2" for h in LATE)]


def simulate(n: int, data: Path, work: Path, rounds: int, steps: int, name: str, extra: list[str]) -> tuple[RunDir, float, float]:
    out = work / name
    cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", str(n), "--partition", PARTITION,
           "--rounds", str(rounds), "--local-steps", str(steps), "--out", str(out),
           "--set", "federation.validation-score=off", "--set", "train.batch-size=32", *extra]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    wall, peak = run_sampled(cmd, work / f"{name}.log")
    return RunDir(out), wall, peak


def churn(n: int, data: Path, work: Path, rounds: int, steps: int) -> dict[str, Any]:
    run, wall, peak = simulate(n, data, work, rounds, steps, f"churn-{n}", CHURN)
    per_round = []
    for record in run.read_rounds():
        late = [f for f in record["failures"] if "round-timeout" in f["reason"]]
        per_round.append({"round": record["round"], "seconds": record["seconds"],
                          "asked": len(record["hospitals"]) + len(record["failures"]) + len(record["declined"])
                          + len(record["rejected"]),
                          "trained": len(record["hospitals"]), "no_reply": len(late),
                          "other_failures": len(record["failures"]) - len(late),
                          "not_joined": len(record["declined"]),
                          "late_joiners_trained": sorted(set(LATE) & set(record["hospitals"]))})
    return {"hospitals": n, "command_seconds": round(wall, 1), "peak_gb": round(peak, 2), "rounds": per_round,
            "finished": run.status().get("state") == "finished"}


def measure(n: int, data: Path, work: Path, rounds: int, steps: int) -> dict[str, Any]:
    run, wall, peak = simulate(n, data, work, rounds, steps, f"hospitals-{n}", [])
    cfg = run.load_config()
    records = run.read_rounds()
    cores = available_cores()
    per_round = []
    for record in records:
        training = sum(h.get("seconds", 0.0) for h in record["hospitals"].values())
        ideal = training / cores
        per_round.append({"round": record["round"], "seconds": record["seconds"], "training_sum": training,
                          "overhead": record["seconds"] - ideal, **record.get("server", {})})
    # the first round pays the workers' start (imports, data loading); later rounds are the steady state
    steady = per_round[1:] or per_round
    counts = run.hospitals.manifest()["counts"]
    sizes = sorted(c["train"] for c in counts.values())
    return {
        "hospitals": n, "train_slices": {"min": sizes[0], "median": float(np.median(sizes)), "max": sizes[-1]},
        "parallel": cfg.simulation.parallel_hospitals, "threads_each": cfg.train.threads,
        "command_seconds": round(wall, 1), "peak_gb": round(peak, 2), "rounds": per_round,
        "round_seconds": float(np.median([r["seconds"] for r in steady])),
        "overhead_seconds": float(np.median([r["overhead"] for r in steady])),
        "overhead_per_hospital": float(np.median([r["overhead"] for r in steady])) / n,
        "aggregate_seconds": float(np.median([r.get("aggregate-seconds", float("nan")) for r in steady])),
        "wait_seconds": float(np.median([r.get("wait-seconds", float("nan")) for r in steady])),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from fedsynth.core.plotting import pyplot

    plt = pyplot()
    n = [r["hospitals"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(n, [r["round_seconds"] for r in rows], "o-", label="round")
    axes[0].plot(n, [r["overhead_seconds"] for r in rows], "s-", label="overhead over the training")
    axes[0].set(xlabel="hospitals", ylabel="seconds per round", title="round time")
    axes[0].legend()
    axes[1].plot(n, [r["overhead_per_hospital"] for r in rows], "o-")
    axes[1].set(xlabel="hospitals", ylabel="seconds", title="overhead per hospital per round")
    axes[1].axhline(0, color="grey", linewidth=0.8)  # below zero: hospitals waited for a core (their seconds include it)
    axes[2].plot(n, [r["peak_gb"] for r in rows], "o-", label="peak memory (GB)")
    axes[2].plot(n, [1000 * r["aggregate_seconds"] for r in rows], "s-", label="aggregation (ms)")
    axes[2].set(xlabel="hospitals", title="memory and aggregation")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["### A consortium at scale: 3 to 30 simulated hospitals", "",
             f"`{result['command']}` on {machine_line(result['machine'])}; brain MRI at 32 px, Dirichlet 0.5 with at "
             "least 20 training slices per hospital, "
             f"{result['rounds']} rounds x {result['local_steps']} local steps (batch 32), validation off. "
             "Per round: the median over rounds after the first (which pays the workers' start).", "",
             "| hospitals | train slices (min / median / max) | at once x threads | round (s) | "
             "hospitals' training, summed (s) | overhead (s) | overhead per hospital (s) | server aggregation (s) | "
             "peak memory (GB) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        steady = r["rounds"][1:] or r["rounds"]
        training = float(np.median([x["training_sum"] for x in steady]))
        s = r["train_slices"]
        lines.append(f"| {r['hospitals']} | {s['min']} / {s['median']:.0f} / {s['max']} | {r['parallel']} x "
                     f"{r['threads_each']} | {r['round_seconds']:.1f} | {training:.1f} | {r['overhead_seconds']:.1f} | "
                     f"{r['overhead_per_hospital']:.2f} | {r['aggregate_seconds']:.3f} | {r['peak_gb']:.2f} |")
    lines += ["", "![round time, overhead per hospital, memory and aggregation](consortium_scale.png)"]
    if result.get("churn"):
        lines += ["", f"With churn: half the hospitals asked each round, {' and '.join(SLOW)} answering after "
                  f"{DELAY} s (federation.round-timeout {TIMEOUT} s), {', '.join(LATE)} joining at round 2.", "",
                  "| hospitals | round | asked | trained | no reply in time | not joined yet | other failures | "
                  "late joiners that trained | round (s) | finished | peak memory (GB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["churn"]:
            for x in r["rounds"]:
                lines.append(f"| {r['hospitals']} | {x['round']} | {x['asked']} | {x['trained']} | {x['no_reply']} | "
                             f"{x['not_joined']} | {x['other_failures']} | {', '.join(x['late_joiners_trained']) or '-'} | "
                             f"{x['seconds']:.1f} | {'yes' if r['finished'] else 'no'} | {r['peak_gb']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consortium_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", default="3,10,30", help="comma-separated consortium sizes (default 3,10,30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps per round (default 20)")
    parser.add_argument("--churn", default="10,30",
                        help="consortium sizes to run with churn (partial participation, slow sites, late joiners); "
                        "empty: none (default 10,30)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/full)")
    args = parser.parse_args(argv)
    out = args.out or HERE / "results" / "full"
    work = out / "work" / "consortium_scale"
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_brain(work, 32, reuse_from=out / "work")
    rows = []
    result: dict[str, Any] = {"machine": machine(), "rounds": args.rounds, "local_steps": args.local_steps,
                              "command": " ".join(["python -m benchmarks.consortium_scale",
                                                   *(sys.argv[1:] if argv is None else argv)])}
    for n in (int(x) for x in args.hospitals.split(",")):
        progress(f"consortium scale: {n} hospitals")
        rows.append(measure(n, data, work, args.rounds, args.local_steps))
        result["rows"] = rows
        write(out, "consortium_scale", result, markdown(result))  # after every size: nothing is lost
    plot(rows, out / "consortium_scale.png")
    for n in (int(x) for x in args.churn.split(",") if x):
        progress(f"consortium scale: {n} hospitals with churn")
        result.setdefault("churn", []).append(churn(n, data, work, args.rounds, args.local_steps))
        write(out, "consortium_scale", result, markdown(result))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
