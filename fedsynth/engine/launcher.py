"""Start Flower's engines for a run: a private SuperLink in simulation mode, then `flwr run`.

fedsynth drives Flower through its own command-line tools, exactly as a user would:
``flower-superlink --simulation`` on a free loopback port, a Flower app folder whose
components are fedsynth's ServerApp and ClientApp, and ``flwr run`` with the run
config. Everything Flower keeps (its home, logs) stays inside the run directory, and
the SuperLink is stopped when the run ends, fails, or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

__all__ = [
    "EngineError",
    "RunOutcome",
    "flower_app_pyproject",
    "flower_env",
    "follow_run",
    "outcome",
    "run_simulation_engine",
    "start_flwr_run",
    "stop_process",
    "tool",
    "write_flower_app",
]

log = logging.getLogger(__name__)

CONNECTION = "fedsynth-simulation"
SERVER_APP = "fedsynth.server.server_app:app"
CLIENT_APP = "fedsynth.client.client_app:app"


class EngineError(RuntimeError):
    """Flower's engine could not be started or the run did not finish."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: the run directory's status and Flower's exit code."""

    status: dict[str, Any]
    returncode: int
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status.get("state") == "finished" and self.returncode == 0


def flower_app_pyproject(cfg: RunConfig, *, client_app: str = CLIENT_APP) -> dict[str, Any]:
    """The ``pyproject.toml`` of a Flower app that runs fedsynth, with every run-config key
    and its default (Flower only accepts overrides of keys it knows)."""
    from fedsynth import __version__

    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "fedsynth-app",
            "version": __version__,
            "description": "fedsynth's ServerApp and ClientApp (code comes from the installed fedsynth "
            "package)",
            "license": "Apache-2.0",
            "dependencies": [f"fedsynth=={__version__}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedsynth",
                    "components": {"serverapp": SERVER_APP, "clientapp": client_app},
                    "config": RunConfig().to_run_config(),
                }
            }
        },
    }


def write_flower_app(folder: Path, cfg: RunConfig, *, client_app: str = CLIENT_APP) -> Path:
    """Write the Flower app folder (a pyproject.toml only)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(flower_app_pyproject(cfg, client_app=client_app)))
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    """A Flower executable from this Python's environment (then PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise EngineError(
            f"'{name}' not found: is flwr installed in this environment? (pip install 'flwr[simulation]')"
        )
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: its own home; no telemetry, no update checks,
    and no runtime dependency installation (which would pull packages from the network)."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
        }
    )
    # The SuperLink starts Flower's other executables (flower-superexec, flwr-simulation)
    # by name: make this environment's bin folder come first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _wait_healthy(port: int, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(f"the SuperLink exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise EngineError(f"the SuperLink did not come up within {timeout:.0f} s; see {log_path}")


def stop_process(*processes: subprocess.Popen[bytes] | None, grace: float = 2.0) -> None:
    """Stop processes and everything they started, all at once: each one's process group,
    and every descendant found before the first signal (Flower's simulation process and
    Ray's daemons and workers lead their own sessions and would outlive it). SIGTERM
    first, SIGKILL to what is left after ``grace`` seconds: one grace for all of them, so
    stopping the run and its SuperLink together takes no longer than stopping one; then at
    most one more grace for the killed to go.

    The grace is short because nothing is lost by killing: every file a run keeps is
    replaced atomically or appended a line at a time, and a hospital's privacy charge is
    saved before it trains. Ray's training workers ignore SIGTERM while they train, so a
    longer grace only delays the stop (5 s made a Ctrl-C take 7.5 s on an idle 2-core
    machine, and over 10 s under load)."""
    import psutil

    family: list[psutil.Process] = []
    leaders = []
    for process in processes:
        if process is None:
            continue
        try:
            if process.poll() is None:
                leader = psutil.Process(process.pid)
                family += [leader, *leader.children(recursive=True)]
                leaders.append(process)
        except psutil.NoSuchProcess:
            process.poll()
    if not family:
        return
    for process in leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    # SIGKILL cannot be refused: what is left is only the kernel tearing processes down (slow
    # for a worker holding a GB under load). One grace for all of it, so a stop takes at most
    # two graces; the leaders, our own children, are reaped as they go.
    deadline = time.monotonic() + grace
    psutil.wait_procs(alive, timeout=grace)
    for process in leaders:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.05, deadline - time.monotonic()))


def run_simulation_engine(
    cfg: RunConfig,
    run: RunDir,
    *,
    on_poll: Callable[[], None] | None = None,
    poll_seconds: float = 0.5,
    client_app: str = CLIENT_APP,
) -> RunOutcome:
    """Run ``cfg`` on Flower's simulation engine with ``cfg.simulation.hospitals`` virtual
    SuperNodes; return when the run has ended.

    ``on_poll`` is called about every ``poll_seconds`` while the run goes on (the CLI
    redraws its progress from the run directory then). ``client_app`` replaces the
    hospitals' ClientApp (``module:attribute``; tests use it to play a hostile hospital).

    Raises
    ------
    EngineError
        The Flower tools are missing or the SuperLink does not start.
    """
    flwr_home = run.root / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": CONNECTION,
                    CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
                },
            }
        )
    )
    app_dir = write_flower_app(flwr_home / "app", cfg, client_app=client_app)
    run_config_path = flwr_home / "run-config.toml"
    run_config_path.write_text(tomli_w.dumps(cfg.to_run_config()))
    env = flower_env(flwr_home)
    superlink_log = run.logs_dir / "superlink.log"
    flower_log = run.logs_dir / "flower.log"
    sim = cfg.simulation
    federation = (
        f"num-supernodes={sim.hospitals} client-resources-num-cpus={sim.client_cpus} "
        f"client-resources-num-gpus={sim.client_gpus:g}"
    )
    # Flower's simulation engine calls ray.init() without an address: RAY_ADDRESS, inherited
    # from the SuperLink, decides whether it joins the configured cluster or starts Ray on
    # this machine ("local"; without it, Ray would join the user's own environment's cluster
    # or one `ray start` left running here).
    env["RAY_ADDRESS"] = sim.ray_address or "local"
    if not sim.ray_address and sim.parallel_hospitals:
        # tell Ray it may hand out that many clients' worth of CPUs
        federation += f" init-args-num-cpus={sim.parallel_hospitals * sim.client_cpus}"
    superlink = client = None
    run.set_status("starting")
    try:
        with open(superlink_log, "ab") as out:
            superlink = subprocess.Popen(
                [
                    tool("flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _wait_healthy(port, superlink, superlink_log)
        client = start_flwr_run(
            app_dir,
            CONNECTION,
            run_config_path,
            env,
            flower_log,
            run.root,
            extra=["--federation-config", federation],
        )
        returncode = follow_run(client, run, on_poll=on_poll, poll_seconds=poll_seconds)
    finally:
        stop_process(client, superlink)
    return outcome(run, returncode, flower_log)


def outcome(run: RunDir, returncode: int | None, log_path: Path) -> RunOutcome:
    status = run.status()
    if returncode is None:  # stopped by us after the ServerApp had already finished
        returncode = 0 if status.get("state") == "finished" else 1
    return RunOutcome(status=status, returncode=returncode, log_path=log_path)


def start_flwr_run(
    app_dir: Path,
    connection: str,
    run_config_path: Path,
    env: dict[str, str],
    log_path: Path,
    cwd: Path,
    *,
    extra: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``flwr run APP CONNECTION --stream --run-config FILE``, its output to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                tool("flwr"),
                "run",
                str(app_dir),
                connection,
                "--stream",
                "--run-config",
                str(run_config_path),
                *(extra or []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=cwd,
        )


def follow_run(
    client: subprocess.Popen[bytes],
    run: RunDir,
    *,
    on_poll: Callable[[], None] | None,
    poll_seconds: float,
) -> int | None:
    """Wait for ``flwr run`` to end, calling ``on_poll`` meanwhile; stop waiting 30 s after
    the run directory says the run ended (``flwr run --stream`` may linger). Returns
    flwr's exit code, or None when it had to be stopped."""
    ended_at = None
    while client.poll() is None:
        if on_poll:
            on_poll()
        if ended_at is None and run.status().get("state") in ("finished", "failed"):
            ended_at = time.monotonic()
        if ended_at is not None and time.monotonic() - ended_at > 30:
            log.warning("flwr run did not exit 30 s after the run ended; stopping it")
            break
        time.sleep(poll_seconds)
    if on_poll:
        on_poll()
    return client.poll()
