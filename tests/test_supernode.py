"""`fedsynth client`'s supervision of the SuperNode (``run_node``), with a stand-in for
Flower's ``flower-supernode``: a script that prints what the real one prints when the
coordinator refuses its key, and starts a helper process as the real one starts its
SuperExec. (The real refusal, by a real SuperLink, is in tests/test_deployment.py.)"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from fedsynth.engine.supernode import HospitalNode, run_node

STAND_IN = """
import subprocess, sys, time
from pathlib import Path
count = Path(sys.argv[1])
starts = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(starts))
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
Path(sys.argv[1] + ".helpers").open("a").write(f"{helper.pid}\\n")
time.sleep(2.0)  # long enough to be seen, as the real one is, on a busy core too
if starts <= int(sys.argv[2]):
    print("[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("connected", flush=True)
"""


def _node(tmp_path: Path, refusals: int) -> tuple[HospitalNode, Path]:
    script = tmp_path / "supernode.py"
    script.write_text(STAND_IN)
    count = tmp_path / "starts"
    return HospitalNode(command=[sys.executable, str(script), str(count), str(refusals)], env=dict(os.environ),
                        summary={}), count


def _alive(pids_file: Path) -> list[int]:
    pids = [int(p) for p in pids_file.read_text().split()]
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_a_refused_supernode_is_started_again_until_the_coordinator_accepts_it(tmp_path: Path) -> None:
    node, count = _node(tmp_path, refusals=2)
    told = []
    code = run_node(node, on_refused=told.append, retry_seconds=0.1)
    assert code == 0 and int(count.read_text()) == 3 and told == [1, 2]
    assert _alive(Path(f"{count}.helpers")) == [], "a helper the SuperNode left running"


def test_max_wait_bounds_the_retries_and_other_failures_are_not_retried(tmp_path: Path) -> None:
    node, count = _node(tmp_path, refusals=100)
    began = time.monotonic()
    assert run_node(node, max_wait=4.5, retry_seconds=0.5) == 1  # each start takes 2 s
    assert 2 <= int(count.read_text()) <= 3 and time.monotonic() - began < 15
    crash = HospitalNode(command=[sys.executable, "-c", "import sys; sys.exit(3)"], env=dict(os.environ), summary={})
    assert run_node(crash, retry_seconds=0.1) == 3  # not a refusal: ends at once with its code
