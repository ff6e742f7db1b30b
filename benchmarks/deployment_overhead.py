"""Per-round overhead of the deployment engine vs the simulation engine, same config.

Three hospitals (the demo's phantom slices at 32 px, or small synthetic blobs), the same
run config, run twice in one go: once through `fedsynth simulate`'s engine (Flower's
simulation runtime), once as a deployment on 127.0.0.1 (`fedsynth server` with TLS and
SuperNode authentication, three `fedsynth client` processes, `fedsynth run`). For each
round: wall seconds (rounds.jsonl) and the slowest hospital's own training seconds; the
difference is the engine's overhead per round. Writes
benchmarks/results/deployment_overhead.{json,md}.

    python benchmarks/deployment_overhead.py [--rounds 3] [--local-steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsynth.engine.deployment import Coordinator
from fedsynth.runs.rundir import RunDir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def per_round(run: RunDir) -> list[dict[str, float]]:
    rows = []
    for record in run.read_rounds():
        train = max(m["seconds"] for m in record["hospitals"].values())
        rows.append({"round": record["round"], "wall": record["seconds"], "train": train,
                     "overhead": record["seconds"] - train})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedsynth-deploy-bench-"))
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200")

    # Simulation: the demo's phantoms, split into three hospitals (this also makes the data).
    subprocess.run([FEDSYNTH, "demo", "--out", str(work / "demo"), "--rounds", str(args.rounds), "--no-audit",
                    "--set", f"train.local-steps={args.local_steps}", "--set", "train.batch-size=32",
                    "--set", "federation.min-hospitals=3"], check=True, env=env, cwd=work, capture_output=True)
    sim = RunDir(work / "demo" / "run")

    # Deployment: same slices, same config.
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), "--out", str(work / "certs"),
                    *[a for h in HOSPITALS for a in ("--hospital", h)]], check=True, capture_output=True)
    port, home = free_port(), work / "coordinator"
    procs = []
    try:
        procs.append(subprocess.Popen([FEDSYNTH, "server", "--certs", str(work / "certs"), "--host", "127.0.0.1",
                                       "--port", str(port), "--home", str(home)], env=env, cwd=work,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        for name in HOSPITALS:
            subprocess.run([FEDSYNTH, "server", "register-hospital", name,
                            str(work / "certs" / "hospitals" / f"{name}.key.pub"), "--home", str(home)],
                           check=True, env=env, cwd=work, capture_output=True)
            procs.append(subprocess.Popen(
                [FEDSYNTH, "client", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                 "--data", str(sim.hospitals.slices(name)), "--ca-cert", str(work / "certs" / "ca.crt"),
                 "--key", str(work / "certs" / "hospitals" / f"{name}.key")],
                env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        # The simulated run's own resolved config: every training setting identical.
        subprocess.run([FEDSYNTH, "run", "--config", str(sim.config_path), "--out", str(work / "deployed"),
                        "--home", str(home)], check=True, env=env, cwd=work, capture_output=True)
        online = [r["hospital"] for r in Coordinator(home).hospitals() if r["status"] == "online"]
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
    dep = RunDir(work / "deployed")
    result = {"simulation": per_round(sim), "deployment": per_round(dep)}
    summary = {}
    for engine, rows in result.items():
        summary[engine] = {k: statistics.median(r[k] for r in rows) for k in ("wall", "train", "overhead")}
    summary["ratio_wall_deployment_over_simulation"] = summary["deployment"]["wall"] / summary["simulation"]["wall"]
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "gpu": "none used (CPU)", "when": time.strftime("%Y-%m-%d %H:%M")}
    payload = {"machine": machine, "rounds": args.rounds, "local_steps": args.local_steps, "image_size": 32,
               "hospitals_online_at_end": online, "per_round": result, "median": summary}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "deployment_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Deployment vs simulation: per-round overhead",
        "",
        f"{machine['cpus']} CPUs, {machine['platform']}, {machine['when']}; 3 hospitals on one machine, 32 px phantoms, "
        f"{args.local_steps} local steps, batch 32, {args.rounds} rounds. Medians over rounds.",
        "",
        "| engine | round wall (s) | slowest hospital's training (s) | overhead per round (s) |",
        "| --- | --- | --- | --- |",
    ]
    for engine in ("simulation", "deployment"):
        m = summary[engine]
        lines.append(f"| {engine} | {m['wall']:.1f} | {m['train']:.1f} | {m['overhead']:.1f} |")
    lines += ["", f"Round wall time, deployment / simulation: {summary['ratio_wall_deployment_over_simulation']:.2f}x.",
              "", "Command: `python benchmarks/deployment_overhead.py "
              f"--rounds {args.rounds} --local-steps {args.local_steps}`"]
    (out / "deployment_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
