"""A hospital in a deployment: a Flower SuperNode whose ClientApp reads only this
hospital's slice set, named in the SuperNode's node config (never in the run config,
which comes from the coordinator)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from fedsynth.data.sliceset import TRAIN, SliceSet
from fedsynth.engine.launcher import flower_env, stop_process, tool
from fedsynth.runs.config import RunConfig

__all__ = [
    "DATA_PATH",
    "HOSPITAL_NAME",
    "PARTITION_ID",
    "STATE_DIR",
    "HospitalNode",
    "NodeError",
    "prepare_node",
    "run_node",
]

# Node config keys a hospital sets on its SuperNode (per hospital, never run config).
DATA_PATH, STATE_DIR, HOSPITAL_NAME = "data-path", "state-dir", "hospital-name"
PARTITION_ID = "partition-id"  # what Flower's simulation engine gives a simulated hospital instead

# What Flower's SuperNode prints before it exits when the SuperLink refuses to activate
# it: its key is not registered, or the SuperLink still holds the previous session of the
# same node (a machine that died and came straight back). Its exit status is a plain 1.
REFUSED = b"Failed to activate SuperNode"
RETRY_SECONDS = 10.0

ADDRESS_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
NODE_CONFIG = "node-config.toml"


class NodeError(ValueError):
    """A hospital's SuperNode cannot start: bad address, missing file, unusable slices."""


@dataclass(frozen=True)
class HospitalNode:
    """What ``fedsynth client`` starts: the command line and a summary to show."""

    command: list[str]
    env: dict[str, str]
    summary: dict[str, Any]


def prepare_node(
    *,
    superlink: str,
    data: Path,
    ca_cert: Path,
    key: Path,
    name: str | None = None,
    state_dir: Path | None = None,
    dp: dict[str, Any] | None = None,
    port: int = 9094,
    max_wait: float = 0.0,
) -> HospitalNode:
    """Check everything a hospital gives, write the node config, and build the SuperNode's
    command line (TLS against the consortium CA, authenticated with the hospital's key).

    Raises
    ------
    NodeError
        Any input that would only fail later, inside Flower, with a less clear message.
    SliceSetError
        The slice set cannot be read.
    ConfigError
        A ``dp.*`` setting out of range.
    """
    if not ADDRESS_RE.match(superlink):
        raise NodeError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. coordinator.example.org:9092")
    data = Path(data).expanduser().resolve()
    ca_cert, key = Path(ca_cert).expanduser().resolve(), Path(key).expanduser().resolve()
    if not ca_cert.is_file():
        raise NodeError(f"{ca_cert}: no such CA certificate (the consortium's ca.crt)")
    if b"-----BEGIN CERTIFICATE-----" not in ca_cert.read_bytes()[:65536]:
        raise NodeError(f"{ca_cert}: not a PEM certificate")
    if not key.is_file():
        raise NodeError(
            f'{key}: no such private key (make one with: ssh-keygen -t ecdsa -b 384 -N "" -f {key})'
        )
    if b"PRIVATE KEY" not in key.read_bytes()[:4096]:
        raise NodeError(f"{key}: not a private key (give the private key, not the .pub)")
    slices = SliceSet.load(data)
    train = int((slices.split == TRAIN).sum())
    if not train:
        raise NodeError(f"{data}: no training slices")
    dp = dict(dp or {})
    if dp:
        RunConfig().with_overrides(dp)  # range checks now, not in the first round
    name = name or key.stem
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else data.parent / "fedsynth-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {DATA_PATH: str(data), HOSPITAL_NAME: name, STATE_DIR: str(state_dir), **dp}
    config_path = state_dir / NODE_CONFIG
    config_path.write_text(tomli_w.dumps(_nest(config)))
    command = [
        tool("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        str(config_path),
        "--port",
        str(port),
    ]
    if max_wait > 0:
        command += ["--max-wait-time", f"{max_wait:g}"]
    summary = {
        "hospital": name,
        "superlink": superlink,
        "data": str(data),
        "slices": len(slices),
        "train": train,
        "image_size": slices.image_size,
        "classes": list(slices.class_names),
        "state_dir": str(state_dir),
        "privacy": dp,
        "node_config": str(config_path),
    }
    return HospitalNode(command=command, env=flower_env(state_dir / "flwr"), summary=summary)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"dp.target-epsilon": 8}`` to ``{"dp": {"target-epsilon": 8}}``: Flower flattens
    a node-config TOML file back to dotted keys."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, tail = key.partition(".")
        if dot:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def _wait_gone(procs: list[Any], timeout: float) -> None:
    """Wait until the killed processes are gone (a kill takes effect when the process next
    runs, late on a busy machine); one whose parent left it unreaped counts as gone."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                alive += p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        if not alive:
            return
        time.sleep(0.05)


def run_node(
    node: HospitalNode,
    *,
    max_wait: float = 0.0,
    on_refused: Callable[[int], None] | None = None,
    retry_seconds: float = RETRY_SECONDS,
) -> int:
    """Run the hospital's SuperNode in the foreground until it ends; returns its exit code.

    When the coordinator refuses to activate the node (Flower exits at once), it is
    started again every ``retry_seconds``: the coordinator may still hold this hospital's
    previous session (a machine that died and came straight back is refused until the
    SuperLink notices, about a minute), or the key is registered later. ``on_refused(n)``
    is called before the n-th retry. ``max_wait`` (0: keep trying) bounds the whole wait,
    counted from the start, as it bounds the SuperNode's own reconnecting.

    The SuperNode's output is relayed to this process's. It stays in this process's group
    (a signal to the group reaches it); whatever it started is stopped when it exits or is
    interrupted: Flower's SuperNode leaves its SuperExec helper running when it fails.
    """
    import psutil

    started = time.monotonic()
    attempt = 0
    while True:
        proc = subprocess.Popen(
            node.command,
            env=node.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        refused = threading.Event()
        relay = threading.Thread(target=_relay, args=(proc.stdout, refused), daemon=True)
        relay.start()
        family: dict[int, psutil.Process] = {}
        try:
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    family.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
                time.sleep(0.2)
        except KeyboardInterrupt:
            # Let the SuperNode say goodbye to the coordinator, or the coordinator holds its
            # session and refuses the next start for about a minute: a terminal's Ctrl-C
            # reached it too; a SIGTERM to this process alone is passed on.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.8)
            raise
        finally:
            stop_process(proc)
            killed = []
            for child in family.values():
                with contextlib.suppress(psutil.Error):
                    child.kill()  # only a process still the same (psutil checks its start time)
                    killed.append(child)
            _wait_gone(killed, timeout=5.0)
            relay.join(timeout=5)
        waited = time.monotonic() - started
        if not refused.is_set() or (max_wait > 0 and waited + retry_seconds > max_wait):
            return proc.returncode
        attempt += 1
        if on_refused is not None:
            on_refused(attempt)
        time.sleep(retry_seconds)


def _die_with_parent() -> None:
    """In the SuperNode's process, before it runs (Linux): a SIGTERM when ``fedsynth
    client`` dies, even by SIGKILL, so no SuperNode outlives the command that started it."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _relay(stream: IO[bytes] | None, refused: threading.Event) -> None:
    """The SuperNode's output, line by line, to this process's; notes a refusal."""
    if stream is None:
        return
    for line in iter(stream.readline, b""):
        if REFUSED in line:
            refused.set()
        with contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop the draining
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
