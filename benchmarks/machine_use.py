"""Machine use of `fedsynth simulate`: do the hospitals keep every core busy all round?

Each arm is a real `fedsynth simulate` on Flower's simulation engine (brain MRI at 64 px
from ../shared/data), the default model.
Images per second are the real slices the discriminators took in, summed over the
hospitals, per second of each round's wall-clock (rounds after the first, which pays
process start-up). The ceiling is the most one process gets from these cores for the
same model: the larger of one hospital with every core's thread, or cores x one
hospital's single-thread rate, both measured in the same run.

    python benchmarks/machine_use.py                      # 3 and 8 hospitals, auto vs waves
    python benchmarks/machine_use.py --hospitals 3 --rounds 3 --local-steps 20

Writes benchmarks/results/machine_use.{json,md}. Run it alone: a second torch process on
the same cores halves every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/machine_use.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FEDSYNTH, HERE, machine, machine_line, prepare_brain, progress, run, write
from fedsynth.core.device import available_cores
from fedsynth.engine.simulation import plan_cores


def _arm(work: Path, data: Path, name: str, hospitals: int, settings: dict[str, Any], rounds: int, steps: int,
         batch: int) -> dict[str, Any]:
    out = work / name
    cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", str(hospitals), "--rounds", str(rounds),
           "--local-steps", str(steps), "--out", str(out), "--set", f"train.batch-size={batch}",
           "--set", "simulation.validation=0", "--set", f"federation.min-hospitals={hospitals}"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    seconds = run(cmd, log=work / f"{name}.log")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:] or rows
    rates = [sum(h["images-seen"] for h in r["hospitals"].values()) / r["seconds"] for r in later]
    own = [statistics.median(h["images-per-second"] for h in r["hospitals"].values()) for r in later]
    return {"hospitals": hospitals, "settings": settings, "wall_seconds": seconds,
            "round_seconds": [r["seconds"] for r in later], "images_per_second": statistics.median(rates),
            "per_hospital_images_per_second": statistics.median(own)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per arm (the first is not counted)")
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="fedsynth-machine-use-") as tmp:
        work = Path(tmp)
        data, described = prepare_brain(work, 64), "brain MRI, 64 px"
        common = dict(rounds=args.rounds, steps=args.local_steps, batch=args.batch)
        progress(f"machine use: one hospital, 1 thread ({described})")
        one = _arm(work, data, "one-1-thread", 1, {"simulation.client-cpus": 1}, **common)
        progress(f"machine use: one hospital, {cores} threads")
        all_threads = _arm(work, data, f"one-{cores}-threads", 1, {"simulation.client-cpus": cores}, **common)
        # the hospital's own training rate, not the round's (which adds the server's share)
        ceiling = max(all_threads["per_hospital_images_per_second"], cores * one["per_hospital_images_per_second"])
        arms: dict[str, Any] = {}
        for h in args.hospitals:
            parallel, cpus = plan_cores(h, cores)
            progress(f"machine use: {h} hospitals, default plan ({parallel} at once, {cpus} thread(s) each)")
            arms[f"{h}-auto"] = _arm(work, data, f"h{h}-auto", h, {}, **common) | {"plan": [parallel, cpus]}
            if (parallel, cpus) != (min(h, cores), 1):
                progress(f"machine use: {h} hospitals, waves of {min(h, cores)} (the old default)")
                arms[f"{h}-waves"] = _arm(work, data, f"h{h}-waves", h, {"simulation.parallel-hospitals": min(h, cores),
                                                                          "simulation.client-cpus": 1}, **common)
        for arm in arms.values():
            arm["machine_use"] = arm["images_per_second"] / ceiling
    result = {"machine": machine(), "data": described, "cores": cores, **vars(args) | {"out": str(args.out)},
              "one_thread": one, "all_threads": all_threads, "ceiling_images_per_second": ceiling, "arms": arms}
    lines = ["## Machine use of `fedsynth simulate`", "", machine_line(result["machine"]), "",
             f"{described}; {args.rounds} rounds x {args.local_steps} steps, batch {args.batch}; rounds after the "
             "first. Ceiling: the larger of one hospital on every core's thread and cores x one hospital's "
             f"single-thread rate: **{ceiling:.0f} images/s** (1 thread "
             f"{one['per_hospital_images_per_second']:.0f}, {cores} threads "
             f"{all_threads['per_hospital_images_per_second']:.0f}).", "",
             "| arm | at once x threads | images/s (summed over hospitals, per round wall-clock) | machine use |",
             "| --- | --- | --- | --- |"]
    for name, arm in arms.items():
        plan = arm.get("plan") or [arm["settings"].get("simulation.parallel-hospitals"), 1]
        lines.append(f"| {name} | {plan[0]} x {plan[1]} | {arm['images_per_second']:.0f} | {arm['machine_use']:.2f} |")
    write(args.out, "machine_use", result, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
