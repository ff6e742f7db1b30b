"""Deployment end to end on 127.0.0.1: a real SuperLink (`fedsynth server`, TLS and
SuperNode authentication, certificates from deploy/make-certs.sh) and three real SuperNodes
(`fedsynth client`), driven by `fedsynth run`, each in its own process as on real machines.

Every process a test starts carries a marker in its environment; at the end of the module
(pass or fail) each one, and everything it started (Flower's ServerApp and ClientApp
processes, even orphaned ones), is found by that marker and stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsynth.engine.deployment import Coordinator
from fedsynth.core.checkpoint import load_checkpoint
from fedsynth.core.weights import AVERAGE, GENERATOR
from fedsynth.runs.rundir import RunDir

from .conftest import REPO, make_slices

pytestmark = [pytest.mark.slow, pytest.mark.whole_machine]

FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")
MARK = "FEDSYNTH_TEST_PROCESS"
HOSPITALS = ("north", "south", "east")
# five more, for the test of a larger consortium in which nodes die and come back
MORE = ("west", "harbour", "valley", "coast", "ridge")
SIZE = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts the test's processes and stops every one of them by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex
        self.started: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, **{MARK: self.tag, "FLWR_HOME": str(root / "flwr-home"),
                                       "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                       "OMP_NUM_THREADS": "1", "COLUMNS": "200"})

    def start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def finish(self, args: list[str], log: str, timeout: float = 120) -> tuple[int, str]:
        """Start a process that should end by itself; its exit code and output. (Not
        ``subprocess.run``: a SuperNode's helper process may hold its pipes open after it
        exits; it is stopped with the rest at the end.)"""
        proc = self.start(args, log)
        code = proc.wait(timeout=timeout)
        return code, (self.root / log).read_text(errors="replace")

    def run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=timeout)

    def marked(self) -> list[int]:
        """PIDs of every live process carrying this test's marker."""
        pids = []
        needle = f"{MARK}={self.tag}".encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while self.marked() and time.monotonic() < deadline:
            time.sleep(0.3)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # SIGKILL what is left, again while anything is (a helper can start another as it
        # goes, and a killed process takes a moment to leave)
        deadline = time.monotonic() + 10
        while self.marked() and time.monotonic() < deadline:
            for pid in self.marked():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        assert not self.marked(), "processes survived the test"


class Consortium:
    """A coordinator and three hospitals on this machine."""

    def __init__(self, root: Path, procs: Processes) -> None:
        self.root, self.procs = root, procs
        self.certs = root / "certs"
        self.home = root / "coordinator"
        self.port = _free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.client_ports = {name: _free_port() for name in HOSPITALS + MORE}
        self.data = {}
        for k, name in enumerate(HOSPITALS + MORE):
            self.data[name] = make_slices(n_patients=8, size=SIZE, seed=k).save(root / "sites" / name / "slices.npz")

    def start_server(self) -> None:
        self.server = self.procs.start([FEDSYNTH, "server", "--certs", str(self.certs), "--host", "127.0.0.1",
                                        "--port", str(self.port), "--home", str(self.home)], "server.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.server.poll() is None, (self.root / "server.log").read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError("the SuperLink did not open its port")

    def client_args(self, name: str, *, key: Path | None = None, ca: Path | None = None, extra=()) -> list[str]:
        own = key is None and ca is None
        return [FEDSYNTH, "client", "--superlink", f"127.0.0.1:{self.port}", "--data", str(self.data[name]),
                "--ca-cert", str(ca or self.certs / "ca.crt"), "--key", str(key or self.certs / "hospitals" / f"{name}.key"),
                "--port", str(self.client_ports[name] if own else _free_port()), *extra]

    def start_client(self, name: str, extra=()) -> None:
        self.clients[name] = self.procs.start(self.client_args(name, extra=extra), f"client-{name}.log")

    def wait_online(self, names, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {r["hospital"] for r in Coordinator(self.home).hospitals() if r["status"] == "online"}
            if set(names) <= online:
                return
            time.sleep(1)
        raise AssertionError(f"hospitals not online: {set(names) - online}")

    def run_config(self, rounds: int, **federation: object) -> Path:
        path = self.root / f"run-{rounds}{''.join(f'-{k}-{v}' for k, v in federation.items())}.yaml"
        path.write_text(yaml.safe_dump({
            "data": {"image-size": SIZE, "class-names": "no_lesion,lesion"},
            "model": {"width": 8},
            "train": {"local-steps": 4, "batch-size": 8, "threads": 1},
            "federation": {"rounds": rounds, "min-hospitals": 2, "round-timeout": 300, **federation},
            "output": {"grid-per-class": 4},
        }))
        return path

    def fedsynth_run(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return self.procs.run([FEDSYNTH, "run", "--home", str(self.home), *args], timeout=timeout)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy")
    procs = Processes(root)
    try:
        made = procs.run(["bash", str(REPO / "deploy" / "make-certs.sh"), "--out", str(root / "certs"),
                          *[a for h in (*HOSPITALS, *MORE, "stranger") for a in ("--hospital", h)]])
        assert made.returncode == 0, made.stderr
        c = Consortium(root, procs)
        c.start_server()
        for name in HOSPITALS:
            done = procs.run([FEDSYNTH, "server", "register-hospital", name,
                              str(c.certs / "hospitals" / f"{name}.key.pub"), "--home", str(c.home)])
            assert done.returncode == 0, done.stdout + done.stderr
        for name in HOSPITALS:
            # north spends a privacy budget of its own (a hospital-side setting).
            c.start_client(name, extra=("--dp.target-epsilon", "8") if name == "north" else ())
        c.wait_online(HOSPITALS)
        yield c
    finally:
        procs.stop_all()


def test_two_rounds_across_three_hospitals_fill_the_run_directory(consortium: Consortium) -> None:
    out = consortium.root / "runs" / "e2e"
    began = time.monotonic()
    done = consortium.fedsynth_run("--config", str(consortium.run_config(2)), "--out", str(out))
    print(f"e2e deployment run: {time.monotonic() - began:.1f} s wall")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 2/2" in done.stdout and "finished 2 of 2 rounds" in done.stdout
    run = RunDir(out)
    assert run.status()["state"] == "finished"
    assert run.checkpoint_rounds() == [0, 1, 2]
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["hospitals"]) == set(HOSPITALS), record  # registered names
        assert not record["failures"] and not record["rejected"]
        for metrics in record["hospitals"].values():
            assert metrics["steps"] == 4 and 0 < metrics["update-norm"] < 3
    # The privacy ledger: north trained under DP with its own budget, the others did not.
    ledger = run.read_privacy()
    assert {row["hospital"] for row in ledger} == {"north"}
    assert all(0 < row["epsilon_rdp"] <= 8 for row in ledger)
    assert (out / "samples" / "round-0002.png").is_file() and run.curves_path.is_file()
    registered = Coordinator(consortium.home).node_names()
    assert json.loads(run.nodes_path.read_text()) == {str(k): v for k, v in registered.items()}
    assert sorted(registered.values()) == sorted(HOSPITALS)
    # `fedsynth server hospitals`: at 80 columns every name and SuperNode id whole; JSON for scripts
    listed = consortium.procs.run([FEDSYNTH, "server", "hospitals", "--home", str(consortium.home), "--format", "json"])
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["hospitals"]
    assert {r["hospital"]: int(r["node_id"]) for r in rows} == {v: k for k, v in registered.items()}
    assert all(r["status"] == "online" for r in rows)
    table = subprocess.run([FEDSYNTH, "server", "hospitals", "--home", str(consortium.home)], capture_output=True,
                           text=True, env={**consortium.procs.env, "COLUMNS": "80"}, timeout=120)
    assert table.returncode == 0 and max(map(len, table.stdout.splitlines())) <= 80, table.stdout
    for r in rows:
        assert r["hospital"] in table.stdout and str(r["node_id"]) in table.stdout, table.stdout


def test_the_server_received_only_generator_arrays_and_scalar_metrics(consortium: Consortium) -> None:
    run = RunDir(consortium.root / "runs" / "e2e")
    model, _ = load_checkpoint(run.checkpoint(2))
    # the checkpoint also keeps the server's running average of the generator: never sent, never received
    expected = {f"arrays/{k}": [list(v.shape), "float32"] for k, v in model.items() if k.startswith(f"{GENERATOR}.")}
    assert any(k.startswith(f"{AVERAGE}.") for k in model)
    messages = run.read_messages()
    assert len(messages) == 2 * len(HOSPITALS), "one reply per hospital per round, each recorded"
    for message in messages:
        assert "error" not in message
        assert message["arrays"] == expected, "exactly the generator's tensors, nothing else"
        for shape, _dtype in message["arrays"].values():
            assert shape[-2:] != [SIZE, SIZE], "no image-sized array"
        assert set(message["metrics"].values()) <= {"int", "float"}, "metrics are scalars"
        for key, kind in message["configs"].items():
            assert key in ("hospital/name", "hospital/dp-unit") and kind.startswith("str["), key


def test_an_unregistered_hospital_key_is_refused(consortium: Consortium) -> None:
    stranger = consortium.certs / "hospitals" / "stranger.key"
    code, output = consortium.procs.finish(consortium.client_args("south", key=stranger, extra=("--max-wait", "10")),
                                           "client-stranger.log")
    assert code != 0
    assert "Failed to activate SuperNode" in output
    assert "stranger" not in {r["hospital"] for r in Coordinator(consortium.home).hospitals()}


def test_a_node_without_the_consortium_ca_cannot_connect(consortium: Consortium) -> None:
    other = consortium.root / "other-ca"
    assert consortium.procs.run(["bash", str(REPO / "deploy" / "make-certs.sh"), "--out", str(other)]).returncode == 0
    code, output = consortium.procs.finish(consortium.client_args("south", ca=other / "ca.crt",
                                                                  extra=("--max-wait", "10")), "client-other-ca.log")
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in output


def start_run_until_round_one(consortium: Consortium, out: Path, *, rounds: int, log: str,
                              **federation: object) -> subprocess.Popen[bytes]:
    """`fedsynth run` in the background, returned once round 1 is in the run directory."""
    proc = consortium.procs.start([FEDSYNTH, "run", "--home", str(consortium.home), "--config",
                                   str(consortium.run_config(rounds, **federation)), "--out", str(out)], log)
    deadline = time.monotonic() + 300
    while not any(r["round"] == 1 for r in RunDir(out).read_rounds()):
        assert proc.poll() is None and time.monotonic() < deadline, (consortium.root / log).read_text()
        time.sleep(0.5)
    return proc


def test_a_restarted_coordinator_resumes_from_the_last_completed_round(consortium: Consortium) -> None:
    out = consortium.root / "runs" / "restart"
    run = RunDir(out)
    proc = start_run_until_round_one(consortium, out, rounds=2, log="run-restart.log")
    consortium.procs.kill(consortium.server)  # the coordinator's machine goes down
    assert proc.wait(timeout=120) != 0
    log = (consortium.root / "run-restart.log").read_text()
    assert "lost the connection to the SuperLink" in log and "--resume" in log
    kept = run.read_rounds()
    consortium.start_server()
    consortium.wait_online(HOSPITALS)  # the SuperNodes reconnect by themselves
    done = consortium.fedsynth_run("--out", str(out), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[: len(kept)] == kept, "nothing completed before the crash is rewritten"
    assert run.status()["state"] == "finished"
    assert run.checkpoint_rounds() == [0, 1, 2]


def test_eight_hospitals_two_killed_and_one_restarted_mid_run_the_run_finishes_naming_every_failure(
    consortium: Consortium,
) -> None:
    """Eight SuperNodes; once round 1 is in, two are killed (SIGKILL: no goodbye to the
    SuperLink) and one of them restarts at once. The run finishes; every hospital asked in
    a round is either among its contributors or named among its failures; no round, no
    checkpoint and no reply record is lost. The one that stayed down comes back and takes
    part when the run is extended, when north declines: it planned its privacy budget
    (epsilon 8, a hospital-side setting) for 2 rounds."""
    everyone = set(HOSPITALS + MORE)
    for name in MORE:
        done = consortium.procs.run([FEDSYNTH, "server", "register-hospital", name,
                                     str(consortium.certs / "hospitals" / f"{name}.key.pub"),
                                     "--home", str(consortium.home)])
        assert done.returncode == 0, done.stdout + done.stderr
        consortium.start_client(name)
    consortium.wait_online(everyone)
    out = consortium.root / "runs" / "eight"
    run = RunDir(out)
    began = time.monotonic()
    proc = start_run_until_round_one(consortium, out, rounds=2, log="run-eight.log", **{"validation-score": "off"})
    consortium.procs.kill(consortium.clients["east"])
    consortium.procs.kill(consortium.clients["west"])
    consortium.start_client("west")  # west's machine comes straight back; east's stays down
    assert proc.wait(timeout=600) == 0, (consortium.root / "run-eight.log").read_text()
    print(f"8 hospitals, 2 rounds, two killed: {time.monotonic() - began:.1f} s wall")
    rounds = run.read_rounds()
    assert run.status()["state"] == "finished" and [r["round"] for r in rounds] == [1, 2]
    assert run.checkpoint_rounds() == [0, 1, 2]
    assert set(rounds[0]["hospitals"]) == everyone and not rounds[0]["failures"]
    for record in rounds:
        failed = [f["hospital"] for f in record["failures"]]
        assert set(record["hospitals"]) | set(failed) == everyone, record
        assert not set(record["hospitals"]) & set(failed)
    assert "east" in {f["hospital"] for f in rounds[1]["failures"]}
    assert {"north", "south", "harbour", "valley", "coast", "ridge"} <= set(rounds[1]["hospitals"])
    # every reply, or the error in its place, is recorded: one line per hospital asked per round
    assert len(run.read_messages()) == 8 + 8
    model, _ = load_checkpoint(run.checkpoint(2))
    assert all(np.isfinite(v.numpy()).all() for v in model.values())
    # east comes back and takes part again when the run is extended.
    consortium.start_client("east")
    consortium.wait_online(everyone)
    done = consortium.fedsynth_run("--out", str(out), "--resume", "--set", "federation.rounds=3")
    assert done.returncode == 0, done.stdout + done.stderr
    last = run.read_rounds()[-1]
    assert last["round"] == 3 and set(last["hospitals"]) == everyone - {"north"}
    assert {d["hospital"] for d in last["declined"]} == {"north"} and "budget" in last["declined"][0]["reason"]


def test_the_documented_deployment_steps_work_when_followed_literally(tmp_path: Path) -> None:
    """deploy/loopback.sh reads the one-machine steps of docs/deployment.md and runs them with bash."""
    procs = Processes(tmp_path)
    try:
        code, output = procs.finish(["bash", str(REPO / "deploy" / "loopback.sh"), str(tmp_path / "work")],
                                    "loopback.log", timeout=900)
        assert code == 0, output[-4000:]
        run = RunDir(tmp_path / "work" / "runs" / "first")
        assert run.status()["state"] == "finished" and run.checkpoint_rounds() == [0, 1, 2]
        rounds = run.read_rounds()
        assert all(set(r["hospitals"]) == {"north", "south", "east"} for r in rounds)
        assert {row["hospital"] for row in run.read_privacy()} == {"east"}  # east's own --dp.target-epsilon
    finally:
        procs.stop_all()
