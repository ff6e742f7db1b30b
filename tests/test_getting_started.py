"""The getting-started page, followed as a newcomer follows it.

The commands are read from ``docs/getting-started.md`` (change a command there and this
test runs the new one) and run with bash in an empty folder: the demo, then the command
the demo prints to draw more samples, then the page's list of commands to try next. Every
path the page's table "What the demo leaves" names must then exist.

Three deviations from the page, to keep the test to two minutes, and nothing else:
- the install (``python3 -m venv .venv && . .venv/bin/activate && pip install -e .``) is
  this test environment's own, which ``.ci/run`` has just installed the same way;
- the two training commands get one round of a few steps (``--rounds 1`` and
  ``--set train.local-steps=5`` appended): what 6 rounds of 300 steps draw is measured in
  BENCHMARKS.md, not here;
- the demo skips its audit (``--no-audit``: 3.5 of its 4 minutes here), so the table's
  ``audit/`` rows are not checked; the demo's audit is the function that
  ``fedsynth audit --federated`` runs, whose files tests/test_report.py checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.runs.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "getting-started.md"
INSTALL = ("python3 -m venv", ". .venv/bin/activate", "pip install")
QUICK = " --rounds 1 --set train.local-steps=5"
NO_AUDIT = " --no-audit"
TRAINING = ("fedsynth demo", "fedsynth simulate")


def _section(heading: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _commands(heading: str) -> list[str]:
    """The bash blocks of one section, a command per line (``&&`` chains split, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _section(heading), re.DOTALL):
        for line in block.splitlines():
            for command in line.split("#", 1)[0].split(" && "):
                if command.strip() and not command.strip().startswith(INSTALL):
                    commands.append(command.strip())
    return commands


def _promised_paths(demo: str) -> list[str]:
    """The first column of the table "What the demo leaves": every backticked path, a bare
    file name in the folder of the path before it, NAME for every hospital."""
    paths: list[str] = []
    for row in _section("What the demo leaves").splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = token if "/" in token.rstrip("/") or not folder else f"{folder}/{token}"
            folder = token.rstrip("/").rsplit("/", 1)[0] if "/" in token.rstrip("/") else ""
            paths.append(f"{demo}/{token}")
    return paths


def _bash(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "80",
        "OMP_NUM_THREADS": "2",
    }
    print(f"$ {command}")
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_newcomer_following_the_getting_started_page_gets_what_it_promises(tmp_path: Path) -> None:
    [demo] = _commands("Install and run the demo")
    assert demo.startswith("fedsynth demo --out ")
    folder = demo.split("--out ", 1)[1].split()[0]
    shown = _bash(demo + QUICK + NO_AUDIT, tmp_path, timeout=900).stdout
    assert "demo finished in" in shown

    promised = [p for p in _promised_paths(folder) if not p.startswith(f"{folder}/audit/")]
    assert len(promised) >= 8, promised
    missing = [p for p in promised if not (tmp_path / p).exists()]
    assert not missing, f"the page promises these, the demo did not leave them: {missing}"
    run = RunDir(tmp_path / folder / "run")
    assert run.status()["state"] == "finished" and run.checkpoint_rounds() == [0, 1]

    # the demo ends with the command to draw more samples: run it as printed
    [more] = [line.strip() for line in shown.splitlines() if line.strip().startswith("fedsynth sample ")]
    _bash(more, tmp_path, timeout=300)
    samples = tmp_path / more.split("--out ", 1)[1].split()[0]
    assert samples.is_dir() and any(samples.iterdir())

    listed = _commands("Commands and configuration")
    assert [c.split()[1] for c in listed] == ["models", "models", "config", "simulate"]
    for command in listed:
        out = _bash(command + (QUICK if command.startswith(TRAINING) else ""), tmp_path, timeout=600).stdout
        if command == "fedsynth models --format json":
            assert "cdcgan" in {row["name"] for row in json.loads(out)["models"]}
    from_yaml = RunDir(tmp_path / "runs" / "from-yaml")
    assert from_yaml.status()["state"] == "finished" and from_yaml.checkpoint_rounds() == [0, 1]
