"""A hospital in a deployment: a Flower SuperNode whose ClientApp reads only this
hospital's slice set, named in the SuperNode's node config (never in the run config,
which comes from the coordinator)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.data.sliceset import TRAIN, SliceSet
from fedsynth.engine.launcher import flower_env, tool
from fedsynth.runs.config import RunConfig

__all__ = [
    "DATA_PATH",
    "HOSPITAL_NAME",
    "PARTITION_ID",
    "STATE_DIR",
    "HospitalNode",
    "NodeError",
    "prepare_node",
]

# Node config keys a hospital sets on its SuperNode (per hospital, never run config).
DATA_PATH, STATE_DIR, HOSPITAL_NAME = "data-path", "state-dir", "hospital-name"
PARTITION_ID = "partition-id"  # what Flower's simulation engine gives a simulated hospital instead

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
