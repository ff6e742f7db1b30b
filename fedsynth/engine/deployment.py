"""The coordinator in a deployment: a SuperLink with TLS and SuperNode authentication, the
register of hospitals it admits, and federated runs launched against it.

Everything the coordinator keeps lives in one folder (``--home``)::

    HOME/server.json        where the SuperLink listens and which certificates it uses
    HOME/hospitals.json     registered hospitals: name, SuperNode id, public key
    HOME/superlink.db       the SuperLink's state (registered nodes, runs): survives a restart
    HOME/flwr/config.toml   the connection Flower's own tools use (FLWR_HOME)
    HOME/logs/superlink.log

The ServerApp runs on the coordinator (a subprocess of the SuperLink) and writes the run
directory there, exactly as in simulation.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.core.errors import ConfigError
from fedsynth.core.files import write_json_atomic, write_text_atomic
from fedsynth.engine.launcher import (
    EngineError,
    RunOutcome,
    flower_env,
    follow_run,
    outcome,
    start_flwr_run,
    stop_process,
    tool,
    write_flower_app,
)
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir, RunDirError, collect_manifest
from fedsynth.runs.tracking import check_tracking

__all__ = [
    "CONNECTION",
    "DEFAULT_PORT",
    "Coordinator",
    "DeploymentError",
    "check_server_certs",
    "create_run",
    "run_deployment",
]

log = logging.getLogger(__name__)

CONNECTION = "fedsynth"
DEFAULT_PORT = 9092
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DeploymentError(RuntimeError):
    """A deployment step that cannot go on: missing certificates, an unreachable SuperLink,
    a refused registration."""


def check_server_certs(certs: Path) -> dict[str, Path]:
    """The CA certificate, the SuperLink's certificate and its key in ``certs``.

    Raises
    ------
    DeploymentError
        A file is missing or is not PEM.
    """
    files = {"ca": certs / "ca.crt", "cert": certs / "server.pem", "key": certs / "server.key"}
    for path in files.values():
        if not path.is_file():
            raise DeploymentError(
                f"{path}: missing (make it with deploy/make-certs.sh --out {certs} --host NAME)"
            )
        if b"-----BEGIN " not in path.read_bytes()[:4096]:
            raise DeploymentError(f"{path}: not a PEM file")
    return {k: v.resolve() for k, v in files.items()}


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's folder and what it knows."""

    home: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())

    @property
    def settings_path(self) -> Path:
        return self.home / "server.json"

    @property
    def registry_path(self) -> Path:
        return self.home / "hospitals.json"

    @property
    def flwr_home(self) -> Path:
        return self.home / "flwr"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / "superlink.log"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def settings(self) -> dict[str, Any]:
        """Raises DeploymentError when no server was ever started with this home."""
        if not self.settings_path.is_file():
            raise DeploymentError(
                f"{self.home} is not a coordinator folder (no server.json): start the server first with "
                f"`fedsynth server --certs DIR --home {self.home}`"
            )
        return json.loads(self.settings_path.read_text())

    def registry(self) -> dict[str, dict[str, Any]]:
        if not self.registry_path.is_file():
            return {}
        return json.loads(self.registry_path.read_text())

    def node_names(self) -> dict[int, str]:
        return {int(v["node_id"]): name for name, v in self.registry().items()}

    # --- starting the SuperLink ----------------------------------------------------------
    def superlink_command(self, certs: Path, *, host: str, port: int) -> list[str]:
        """Write the settings and Flower's connection, and return the SuperLink's command
        line: TLS with the consortium's certificates, only registered SuperNodes admitted,
        state kept on disk, no dependency installation from the network."""
        files = check_server_certs(Path(certs))
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        # The coordinator's own tools connect locally (make-certs.sh puts localhost and
        # 127.0.0.1 in the certificate); a SuperLink bound to one address is reached there.
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "127.0.0.1") else host
        settings = {
            "host": host,
            "port": port,
            "address": f"{local}:{port}",
            "certs": {k: str(v) for k, v in files.items()},
        }
        write_json_atomic(self.settings_path, settings)
        write_text_atomic(
            self.flwr_home / "config.toml",
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {"address": settings["address"], "root-certificates": str(files["ca"])},
                    }
                }
            ),
        )
        return [
            tool("flower-superlink"),
            "--ssl-ca-certfile",
            str(files["ca"]),
            "--ssl-certfile",
            str(files["cert"]),
            "--ssl-keyfile",
            str(files["key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.home / "superlink.db"),
            "--log-file",
            str(self.log_path),
            "--host",
            host,
            "--port",
            str(port),
        ]

    # --- hospitals -----------------------------------------------------------------------
    def _flwr(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run a ``flwr`` command against this SuperLink with JSON output."""
        settings = self.settings()
        try:
            done = subprocess.run(
                [tool("flwr"), *args, "--format", "json"],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.home,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"no answer from the SuperLink at {settings['address']} within {timeout:.0f} s"
            ) from None
        payload = _last_json(done.stdout)
        if payload is None or not payload.get("success", False):
            message = (payload or {}).get("error-message") or (
                done.stderr or done.stdout
            ).strip().splitlines()[-1:]
            if isinstance(message, list):
                message = message[0] if message else f"exit code {done.returncode}"
            lines = [line.strip() for line in str(message).splitlines() if line.strip()]
            message = lines[-1] if lines else f"exit code {done.returncode}"
            reachable = "unavailable" not in str(message).lower() and "connect" not in str(message).lower()
            raise DeploymentError(
                f"the SuperLink at {settings['address']} refused ({message})"
                if reachable
                else f"the SuperLink at {settings['address']} could not be reached ({message}); is `fedsynth "
                "server` running?"
            )
        return payload

    def _flwr_when_up(self, *args: str, wait: float = 30.0) -> dict[str, Any]:
        """``_flwr``, retried while the server is still starting (its settings not yet
        written, or the SuperLink not yet listening), for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._flwr(*args)
            except DeploymentError as err:
                starting = "could not be reached" in str(err) or "not a coordinator folder" in str(err)
                if not starting or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def register(self, name: str, public_key: Path) -> int:
        """Admit a hospital: register its public key with the SuperLink under ``name``.

        Raises
        ------
        DeploymentError
            A bad name, a missing or non-ECDSA key, a name or key already registered, or
            a SuperLink that refuses.
        """
        if not NAME_RE.match(name):
            raise DeploymentError(f"hospital name {name!r}: use letters, digits, '.', '_' or '-' (up to 63)")
        public_key = Path(public_key).expanduser()
        if not public_key.is_file():
            raise DeploymentError(f"{public_key}: no such public key file")
        text = public_key.read_text(errors="replace").strip()
        if not text.startswith("ecdsa-sha2-nistp"):
            raise DeploymentError(
                f"{public_key}: not an ECDSA public key in OpenSSH format "
                '(make one with: ssh-keygen -t ecdsa -b 384 -N "" -f hospital.key; send hospital.key.pub)'
            )
        registry = self.registry()
        if name in registry:
            raise DeploymentError(f"{name} is already registered (SuperNode {registry[name]['node_id']})")
        for other, entry in registry.items():
            if entry.get("public_key") == text:
                raise DeploymentError(f"{public_key}: this key is already registered as {other}")
        payload = self._flwr_when_up(
            "supernode", "register", str(public_key.resolve()), CONNECTION, "--name", name
        )
        node_id = int(payload["node-id"])
        registry[name] = {
            "node_id": str(node_id),
            "public_key": text,
            "registered": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.registry_path, registry)
        return node_id

    def hospitals(self) -> list[dict[str, Any]]:
        """Registered hospitals with what the SuperLink says of them (online or not)."""
        nodes = {str(n["node-id"]): n for n in self._flwr("supernode", "list", CONNECTION).get("nodes", [])}
        rows = []
        for name, entry in sorted(self.registry().items()):
            node = nodes.get(str(entry["node_id"]), {})
            rows.append(
                {
                    "hospital": name,
                    "node_id": entry["node_id"],
                    "status": node.get("status", "unknown"),
                    "online_at": node.get("online-at", ""),
                    "registered": entry.get("registered", ""),
                }
            )
        return rows


def create_run(cfg: RunConfig, run: RunDir, coordinator: Coordinator) -> RunConfig:
    """Check a new deployment run's config and create its run directory (config and
    manifest) on the coordinator. Returns the config as saved (paths filled in).

    Raises
    ------
    ConfigError
        What the server needs and cannot get from the hospitals (it holds no slices):
        the classes, and what the run's family needs.
    RunDirError
        The run directory already holds a run.
    """
    if not cfg.data.classes:
        raise ConfigError(
            "data.class-names is empty: in a deployment the coordinator has no slices, so the run config "
            "must name the classes (as the hospitals' slice sets do), e.g. --set "
            "data.class-names=glioma,meningioma,no-tumor,pituitary"
        )
    cfg.model.family.check_deployment(cfg)
    check_tracking(cfg)
    if run.last_round() is not None or run.config_path.exists():
        raise RunDirError(f"{run.root} already holds a run: continue it with --resume, or choose a new --out")
    cfg = cfg.with_overrides(
        {"output.run-dir": str(run.root), "output.resume": False, "simulation.hospitals-dir": ""}
    )
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    run.write_json(
        run.manifest_path,
        collect_manifest(
            seeds={"train": cfg.train.seed},
            deployment={
                "superlink": coordinator.settings()["address"],
                "hospitals": sorted(coordinator.registry()),
            },
        ),
    )
    return cfg


def run_deployment(
    cfg: RunConfig,
    run: RunDir,
    coordinator: Coordinator,
    *,
    on_poll: Callable[[], None] | None = None,
    poll_seconds: float = 0.5,
) -> RunOutcome:
    """Launch ``cfg`` on the coordinator's SuperLink with ``flwr run`` and follow it in the
    run directory until it ends. Interrupting stops the run on the SuperLink too.

    Raises
    ------
    EngineError
        Flower's tools are missing or ``flwr run`` cannot start.
    """
    coordinator.settings()
    run.root.mkdir(parents=True, exist_ok=True)
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    flower_dir = run.root / ".flower"
    app_dir = write_flower_app(flower_dir / "app", cfg)
    run_config_path = flower_dir / "run-config.toml"
    run_config_path.write_text(tomli_w.dumps(cfg.to_run_config()))
    names = coordinator.node_names()
    if names:
        run.write_json(run.nodes_path, {str(k): v for k, v in names.items()})
    flower_log = run.logs_dir / "flower.log"
    run.set_status("starting")
    client = None
    try:
        client = start_flwr_run(app_dir, CONNECTION, run_config_path, coordinator.env(), flower_log, run.root)
        returncode = follow_run(client, run, on_poll=on_poll, poll_seconds=poll_seconds)
    except KeyboardInterrupt:
        _stop_on_superlink(coordinator, flower_log)
        raise
    finally:
        stop_process(client)
    state = run.status().get("state")
    if returncode not in (None, 0) and state == "starting":
        raise EngineError(f"flwr run exited with code {returncode} before the run started; see {flower_log}")
    if returncode not in (None, 0) and state == "running":
        # The ServerApp could not say so itself: the SuperLink (and it) went away.
        run.set_status("failed", error="lost the connection to the SuperLink (was the coordinator stopped?)")
    return outcome(run, returncode, flower_log)


def _stop_on_superlink(coordinator: Coordinator, flower_log: Path) -> None:
    """``flwr stop`` the run this ``flwr run`` started (its id is in Flower's log)."""
    match = (
        re.findall(r"[Rr]un (?:ID )?(\d{3,})", flower_log.read_text(errors="replace"))
        if flower_log.is_file()
        else []
    )
    if not match:
        return
    try:
        subprocess.run(
            [tool("flwr"), "stop", match[0], CONNECTION],
            env=coordinator.env(),
            capture_output=True,
            timeout=30,
            cwd=coordinator.home,
        )
    except (subprocess.TimeoutExpired, EngineError):
        log.warning("could not stop run %s on the SuperLink", match[0])


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object at the end of a ``flwr --format json`` output (logs may precede it)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None
