"""Run fedsynth's benchmarks: performance and quality, side by side, written to files.

    python -m benchmarks.run --quick     # about 13 minutes: every benchmark at a tiny size (checks they run)
    python -m benchmarks.run --full      # about an hour on 2 CPU cores: the figures in BENCHMARKS.md

Writes, in --out (default benchmarks/results/quick or benchmarks/results/full):
summary.md (every table, the machine, the command), summary.json (every figure), one
NAME.json + NAME.md per benchmark, plots (fidelity_arms.png, privacy_utility.png,
lowdata_gain.png) and grids/ (the last sample grid of every quality arm, and real.png).
Training runs, audits and logs go to --work (kept, so an interrupted --full run resumes
the quality arms it had finished). Needs the brain MRI slices in ../shared/data (or
FEDSYNTH_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fedsynth.core.files import write_json_atomic

from .common import HERE, machine, machine_line, prepare_brain, write

PERF_QUICK = {"size": 32, "steps": 3, "repeats": 2, "batch": 32, "threads": 2, "fed_rounds": 2, "fed_steps": 5,
              "memory_steps": 3, "audit_sizes": [120, 240], "full_audit_max": 120,
              "classifier_steps": 60, "encoder_steps": 100}
PERF_FULL = {"size": 64, "steps": 10, "repeats": 5, "batch": 64, "threads": 2, "fed_rounds": 5, "fed_steps": 50,
             "memory_steps": 20, "audit_sizes": [1000, 5000, 20000, 50000], "full_audit_max": 20000,
             "classifier_steps": 0, "encoder_steps": 0}


SECTIONS = (("Performance", ("trainer_overhead", "dp_overhead", "federation_overhead", "peak_memory", "audit_scaling")),
            ("Quality", ("quality",)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="tiny sizes: minutes; checks every benchmark runs")
    mode.add_argument("--full", action="store_true", help="the real figures: about an hour on 2 CPU cores")
    parser.add_argument("--only", help="comma-separated: perf, quality, or single benchmarks (trainer_overhead, "
                        "dp_overhead, federation_overhead, peak_memory, audit_scaling)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/quick|full)")
    parser.add_argument("--work", type=Path, help="training runs, audits, logs (default OUT/work)")
    args = parser.parse_args(argv)
    known = {"perf", "quality", *SECTIONS[0][1]}
    only = set(args.only.split(",")) if args.only else {"perf", "quality"}
    if only - known:
        parser.error(f"--only {args.only}: unknown {', '.join(sorted(only - known))} (choose from {', '.join(sorted(known))})")
    if "perf" in only:
        only |= set(SECTIONS[0][1])
    # Opacus's reference path in the DP benchmark trips this harmless torch warning.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from . import perf, quality

    name = "quick" if args.quick else "full"
    out = args.out or HERE / "results" / name
    work = args.work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    m = machine()
    summary_path = out / "summary.json"
    # With --only, the other half's figures (from an earlier run into the same folder) are kept.
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if args.only and summary_path.exists() else {}
    summary.setdefault("results", {})
    summary["mode"] = name
    summary.setdefault("commands", []).append({"command": command, "machine": m})

    def record(key: str, produced: tuple[dict[str, Any], list[str]]) -> None:
        result, lines = produced
        result["machine"], result["command"] = m, command
        write(out, key, result, lines)
        summary["results"][key] = result
        # rewritten after every benchmark: nothing measured is lost if a later one fails
        write_json_atomic(summary_path, summary)
        md = [f"# fedsynth benchmarks ({name})", ""]
        for cmd in summary["commands"]:
            md += [f"- `{cmd['command']}` on {machine_line(cmd['machine'])}"]
        for title, keys in SECTIONS:
            present = [k for k in keys if k in summary["results"] and (out / f"{k}.md").exists()]
            if present:
                md += ["", f"## {title}", ""]
                for k in present:
                    md += [(out / f"{k}.md").read_text().rstrip(), ""]
        (out / "summary.md").write_text("\n".join(md) + "\n")

    if only & set(SECTIONS[0][1]):
        p = PERF_QUICK if args.quick else PERF_FULL
        progress(f"perf: preparing the brain MRI slices at {p['size']} px")
        data = prepare_brain(work, p["size"], limit=600 if args.quick else None)
        if "trainer_overhead" in only:
            progress("perf: trainer overhead (bare loop vs train_round vs run_local_round)")
            record("trainer_overhead", perf.trainer_overhead(data, steps=p["steps"], repeats=p["repeats"], batch=p["batch"],
                                                             threads=p["threads"]))
        if "dp_overhead" in only:
            progress("perf: DP step vs plain step")
            record("dp_overhead", perf.dp_step_overhead(size=p["size"], steps=p["steps"], repeats=p["repeats"],
                                                        batch=p["batch"], threads=p["threads"], out=work))
        if "federation_overhead" in only:
            progress(f"perf: federation overhead (3 hospitals x {p['fed_rounds']} rounds)")
            record("federation_overhead", perf.federation_overhead(data, work, hospitals=3, rounds=p["fed_rounds"],
                                                                   steps=p["fed_steps"], batch=p["batch"],
                                                                   threads=p["threads"]))
        if "peak_memory" in only:
            progress("perf: peak memory of one hospital's local round")
            record("peak_memory", perf.peak_memory(data, work, hospitals=3, steps=p["memory_steps"], threads=p["threads"]))
        if "audit_scaling" in only:
            progress(f"perf: audit scaling at {', '.join(map(str, p['audit_sizes']))} images")
            record("audit_scaling", perf.audit_scale(p["audit_sizes"], image_size=p["size"], threads=p["threads"],
                                                     full_audit_max=p["full_audit_max"], work=work,
                                                     steps=p["classifier_steps"], encoder_steps=p["encoder_steps"]))
    if "quality" in only:
        cfg = quality.QUICK if args.quick else quality.FULL
        result, lines = quality.run_quality(cfg, work / "quality", out, progress)
        lines += ["", "![fidelity per arm](fidelity_arms.png)", "", "![privacy-utility](privacy_utility.png)", "",
                  "![low-data gains](lowdata_gain.png)"]
        record("quality", (result, lines))
    progress(f"done: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
