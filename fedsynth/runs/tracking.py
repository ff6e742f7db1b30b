"""A run as ML engineers already watch one: TensorBoard event files, and MLflow if asked.

The server writes both as each round finishes, from the very records it has just
appended to ``rounds.jsonl`` and the privacy ledger, so they hold the same figures and
nothing more: a hospital under DP shows there only what it shows in the run directory
(no discriminator loss). Layout::

    RUN/tensorboard/events.out.tfevents.*   scalars, each round's sample grid, the config
    RUN/tracking.json                       the MLflow run this run logs to (a resumed
                                            run continues it)

Tags are ``METRIC/HOSPITAL`` (``d-loss/hospital-a``, ``update-norm/hospital-b``,
``epsilon-rdp/hospital-a``, ``validation-fd/all``) and ``round/...`` for the round as a
whole (seconds, hospitals trained, failures, rejected and declined updates); the step is
the round. MLflow gets the same keys as metrics, the resolved config as parameters,
each round's grid, and at the end ``config.yaml``, ``curves.png`` and the last
checkpoint as artifacts.

Logging never stops a federated run: a sink that fails is reported once and switched
off; the run directory's own files remain the record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.core.errors import ConfigError
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

__all__ = ["RunTracker", "attach_files", "check_tracking", "end_interrupted", "mlflow_store", "round_scalars"]

log = logging.getLogger(__name__)

MLFLOW_MISSING = (
    "output.mlflow is set but MLflow is not installed: pip install 'fedsynth[mlflow]' (or mlflow-skinny), "
    "or leave output.mlflow empty"
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def round_scalars(
    record: dict[str, Any],
    privacy: list[dict[str, Any]] = (),  # type: ignore[assignment]
    client_privacy: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, float]:
    """The round's figures as ``tag -> value``: every number a hospital reported (its
    ``rounds.jsonl`` metrics), the validation scores, epsilon spent per hospital (the
    round's ledger lines) and the client-level release's epsilon."""
    scalars: dict[str, float] = {
        "round/seconds": float(record.get("seconds", 0.0)),
        "round/hospitals-trained": float(len(record.get("hospitals", {}))),
        **{f"round/{key}": float(len(record.get(key) or [])) for key in ("failures", "rejected", "declined")},
    }
    for name, metrics in sorted(record.get("hospitals", {}).items()):
        for key, value in metrics.items():
            if _number(value):
                scalars[f"{key}/{name}"] = float(value)
    for part in ("server", "fit"):  # the server's timings; dp-merf's fit of the generator
        for key, value in (record.get(part) or {}).items():
            if _number(value):
                scalars[f"{part}/{key}"] = float(value)
    validation = record.get("validation") or {}
    if _number(validation.get("fd")):
        scalars["validation-fd/all"] = float(validation["fd"])
    for name, score in sorted((validation.get("hospitals") or {}).items()):
        if _number(score.get("fd")):
            scalars[f"validation-fd/{name}"] = float(score["fd"])
    for row in privacy:
        for key in ("epsilon_rdp", "epsilon_prv"):
            if _number(row.get(key)):
                scalars[f"{key.replace('_', '-')}/{row['hospital']}"] = float(row[key])
    for row in client_privacy:
        if _number(row.get("epsilon_rdp")):
            scalars["client-dp/epsilon-rdp"] = float(row["epsilon_rdp"])
    return scalars


def mlflow_store(uri: str) -> tuple[str, str | None]:
    """The tracking URI for ``output.mlflow`` (as the config makes it absolute), and
    where a local store keeps artifacts.

    A folder becomes ``sqlite:///FOLDER/mlflow.db`` with artifacts in ``FOLDER/artifacts``
    (MLflow 3 refuses its old folder store); an SQLite database keeps its artifacts in
    ``artifacts/`` beside it. A tracking server keeps them where it is set up to.
    """
    if uri.startswith("sqlite:///"):
        return uri, (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    if "://" in uri or uri.startswith("databricks"):
        return uri, None
    folder = Path(uri)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def check_tracking(cfg: RunConfig) -> None:
    """Fail before the run starts, in one line, if ``output.mlflow`` cannot be honoured.

    Raises
    ------
    ConfigError
        MLflow is not installed.
    """
    if cfg.output.mlflow:
        _client_class()


class RunTracker:
    """TensorBoard (``output.tensorboard``) and MLflow (``output.mlflow``) for one
    ServerApp's rounds.

    ``resumed_after`` is the round a resumed run continues from (its last checkpoint):
    that round is logged again from ``rounds.jsonl`` (the server may have died after its
    checkpoint and before logging it), replacing in TensorBoard whatever an interrupted
    run had logged from it on.
    """

    def __init__(self, run: RunDir, cfg: RunConfig, *, resumed_after: int | None = None) -> None:
        self.run = run
        self.cfg = cfg
        self._writer: Any = None
        self._mlflow: _MlflowRun | None = None
        if cfg.output.tensorboard:
            self._guard("TensorBoard", lambda: self._open_tensorboard(resumed_after))
        if cfg.output.mlflow:
            self._guard("MLflow", lambda: self._open_mlflow(resumed_after))
        if resumed_after is not None:
            self.round(self._record_of(resumed_after), replay=True)

    def _record_of(self, round_: int) -> dict[str, Any]:
        """A finished round's record as the server wrote it (round 0: its grid only)."""
        for record in reversed(self.run.read_rounds()):
            if record.get("round") == round_:
                return record
        grid = self.run.grid(round_)
        return {"round": round_, "grid": str(grid.relative_to(self.run.root)) if grid.is_file() else None}

    def _open_tensorboard(self, resumed_after: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.run.tensorboard_dir), purge_step=resumed_after)
        self._writer.add_text("config", "```yaml\n" + self.cfg.to_yaml() + "```", resumed_after or 0)
        self._writer.flush()

    def _open_mlflow(self, resumed_after: int | None) -> None:
        self._mlflow = _MlflowRun(self.run, self.cfg, resume=resumed_after is not None)

    def _guard(self, sink: str, action: Any) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - logging must never stop the run
            log.warning(
                "%s logging failed (%s: %s); the run goes on and its own files are complete",
                sink,
                type(err).__name__,
                err,
            )
            if sink == "TensorBoard":
                self._close_writer()
            else:
                self._mlflow = None

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def round(self, record: dict[str, Any], *, replay: bool = False) -> None:
        """Log a finished round (``record`` as appended to ``rounds.jsonl``; round 0, the
        initial generator, only as its grid)."""
        if self._writer is None and self._mlflow is None:
            return
        round_ = int(record["round"])
        scalars: dict[str, float] = {}
        if round_ > 0 and "hospitals" in record:
            privacy = [r for r in self.run.read_privacy() if r.get("round") == round_]
            client = [r for r in self.run.read_client_privacy() if r.get("round") == round_]
            scalars = round_scalars(record, privacy, client)
        grid = self.run.root / record["grid"] if record.get("grid") else None
        if self._writer is not None:
            self._guard("TensorBoard", lambda: self._tensorboard_round(round_, scalars, grid))
        mlflow_run = self._mlflow
        if mlflow_run is not None and not (replay and mlflow_run.has_round(round_)):
            self._guard("MLflow", lambda: mlflow_run.round(round_, scalars, grid))

    def _tensorboard_round(self, round_: int, scalars: dict[str, float], grid: Path | None) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, round_)
        if grid is not None and grid.is_file():
            from PIL import Image

            with Image.open(grid) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image("samples", pixels, round_, dataformats="HWC")
        self._writer.flush()

    def close(self, state: str) -> None:
        """End both sinks; ``state`` is the run's: finished or failed."""
        self._close_writer()
        mlflow_run, self._mlflow = self._mlflow, None
        if mlflow_run is not None:
            self._guard("MLflow", lambda: mlflow_run.close(state))


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED"}


def _client_class() -> Any:
    """MLflow's client class, or a ConfigError saying how to install it."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(MLFLOW_MISSING) from None
    return MlflowClient


def _client(uri: str) -> Any:
    """An MLflow client; a tracking server that is down costs seconds, not MLflow's
    default minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return _client_class()(uri)


def _saved_run(run: RunDir) -> dict[str, str] | None:
    if not run.tracking_path.is_file():
        return None
    saved: dict[str, str] = json.loads(run.tracking_path.read_text())["mlflow"]
    return saved


class _MlflowRun:
    """One fedsynth run as one MLflow run (continued on resume, by ``RUN/tracking.json``)."""

    def __init__(self, run: RunDir, cfg: RunConfig, *, resume: bool) -> None:
        self.run = run
        uri, artifacts = mlflow_store(cfg.output.mlflow)
        self.client = _client(uri)
        saved = _saved_run(run)
        if resume and saved and saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "fedsynth.resumed", "true")
            return
        experiment = self.client.get_experiment_by_name(cfg.output.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.output.mlflow_experiment, artifact_location=artifacts)
        )
        created = self.client.create_run(
            experiment_id,
            run_name=run.root.name,
            tags={"fedsynth.run-dir": str(run.root), "fedsynth.model": cfg.model.name},
        )
        self.run_id = created.info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in sorted(cfg.to_run_config().items())]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        run.write_json(
            run.tracking_path,
            {"mlflow": {"tracking_uri": uri, "experiment": experiment_id, "run_id": self.run_id}},
        )

    def has_round(self, round_: int) -> bool:
        history = self.client.get_metric_history(self.run_id, "round/seconds")
        return any(m.step == round_ for m in history) or (
            round_ == 0 and bool(self.client.list_artifacts(self.run_id, "samples"))
        )

    def round(self, round_: int, scalars: dict[str, float], grid: Path | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", tag), value, now, round_) for tag, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        if grid is not None and grid.is_file():
            self.client.log_artifact(self.run_id, str(grid), artifact_path="samples")

    def close(self, state: str) -> None:
        try:
            for path in (self.run.config_path, self.run.curves_path):
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            last = self.run.last_round()
            if last is not None:
                self.client.log_artifact(
                    self.run_id, str(self.run.checkpoint(last)), artifact_path="checkpoints"
                )
        finally:
            self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(state, "FINISHED"))


def end_interrupted(run: RunDir) -> None:
    """Mark the run's MLflow run KILLED after Ctrl-C or SIGTERM (the ServerApp was
    stopped before it could say so), if it logged to one."""
    try:
        saved = _saved_run(run)
        if saved:
            _client(saved["tracking_uri"]).set_terminated(saved["run_id"], status="KILLED")
    except Exception as err:  # noqa: BLE001 - the run directory already says interrupted
        log.warning("could not mark the MLflow run interrupted (%s: %s)", type(err).__name__, err)


def attach_files(run: RunDir, paths: list[Path], artifact_path: str) -> str | None:
    """Add files made after the run (an audit's report) to the MLflow run it logged to,
    if it logged to one; returns where they went, or None. A failure is a warning: the
    files themselves are already written."""
    try:
        saved = _saved_run(run)
        if not saved:
            return None
        client = _client(saved["tracking_uri"])
        for path in paths:
            if path.is_file():
                client.log_artifact(saved["run_id"], str(path), artifact_path=artifact_path)
    except Exception as err:  # noqa: BLE001 - the audit is written; MLflow is a copy
        log.warning("could not add %s to the MLflow run (%s: %s)", artifact_path, type(err).__name__, err)
        return None
    return f"MLflow run {saved['run_id']} ({saved['tracking_uri']}), artifacts {artifact_path}/"
