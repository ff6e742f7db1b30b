"""Flower ClientApp: turn a training message into a local round and its reply."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.hospital import (
    HospitalSite,
    LocalRoundResult,
    release_summary,
    run_local_round,
    score_validation,
)
from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.weights import DISCRIMINATOR, GENERATOR, split_model
from fedsynth.engine.records import (
    ARRAYS,
    CONFIG,
    HOSPITAL,
    HOSPITALS_ASKED,
    METRICS,
    number,
    record_to_tensors,
    tensors_to_record,
)
from fedsynth.engine.secure import (
    is_secure_request,
    read_secure_request,
    secure_aggregation_mod,
    secure_reply,
)
from fedsynth.engine.strategy import RELEASE
from fedsynth.engine.supernode import DATA_PATH, HOSPITAL_NAME, PARTITION_ID, STATE_DIR
from fedsynth.models import EMBEDDING
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import Hospitals

__all__ = ["app", "site_from_context"]

app = ClientApp()


def site_from_context(context: Context, cfg: RunConfig) -> HospitalSite:
    """Where this hospital's data and state are.

    In a deployment the SuperNode's node config names them (``data-path``, optional
    ``state-dir`` and ``hospital-name``). In simulation Flower only gives a partition id,
    which indexes the per-hospital slice sets ``fedsynth simulate`` wrote.

    Raises
    ------
    ValueError
        Neither a ``data-path`` node config nor a simulation hospitals folder.
    """
    node = context.node_config
    run_name = Path(cfg.output.run_dir).name
    if DATA_PATH in node:
        data_path = Path(str(node[DATA_PATH])).expanduser()
        state_root = Path(str(node.get(STATE_DIR, data_path.parent / "fedsynth-state")))
        name = str(node.get(HOSPITAL_NAME, data_path.stem))
        overrides = {k: v for k, v in node.items() if k.startswith("dp.")}
        # The privacy ledger belongs to the data, not to the run: every run on this slice
        # set spends from the same budget.
        ledger = (
            state_root / "privacy" / f"{file_sha256(data_path)[:16]}.json" if data_path.is_file() else None
        )
        return HospitalSite(
            name=name,
            data_path=data_path,
            state_dir=state_root / run_name,
            overrides=overrides,
            privacy_path=ledger,
        )
    if PARTITION_ID in node and cfg.simulation.hospitals_dir:
        hospitals = Hospitals(cfg.simulation.hospitals_dir)
        name = hospitals.names()[int(node[PARTITION_ID])]
        return HospitalSite(
            name=name,
            data_path=hospitals.slices(name),
            state_dir=hospitals.state(name).folder,
            overrides=hospitals.settings(name),
        )
    raise ValueError(
        "this SuperNode has no 'data-path' in its node config (start it with --node-config "
        "\"data-path='/path/slices.npz'\")"
    )


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Run one local GAN round on the global generator and reply with the new weights; for
    a family that federates a summary (dp-merf), reply with the hospital's release; in a
    secure round (``federation.secure-aggregation``), reply with the update for SecAgg+
    to mask."""
    cfg = RunConfig.from_run_config(context.run_config)
    site = site_from_context(context, cfg)
    secure = is_secure_request(msg.content)
    config: Mapping[str, Any]
    if secure:
        global_model, config = read_secure_request(msg.content)
        tensors_in = {k: torch.from_numpy(v.copy()) for k, v in global_model.items()}
    else:
        config = msg.content.config_records[CONFIG]
        tensors_in = record_to_tensors(msg.content.array_records[ARRAYS])
    server_round = int(number(config["server-round"]))
    asked = int(number(config[HOSPITALS_ASKED])) if HOSPITALS_ASKED in config else 1
    delay, joins = cfg.simulation.rehearsal(site.name) if PARTITION_ID in context.node_config else (0.0, 1)
    timeout = cfg.federation.round_timeout
    if delay > timeout:
        # A rehearsed slow site (simulation.slow) whose answer would come too late: it holds
        # its simulation worker only as long as the server waits, then gives up (a worker
        # held for the whole delay would keep other hospitals from training).
        time.sleep(timeout)
        raise RuntimeError(
            f"{site.name}: simulation.slow: answers after {delay:g} s, past federation.round-timeout "
            f"({timeout:g} s)"
        )
    time.sleep(delay)
    try:
        result: LocalRoundResult
        if server_round < joins:  # a rehearsed late joiner (simulation.join)
            result = LocalRoundResult(
                None, None, None, declined=f"not joined until round {joins} (simulation.join)"
            )
        elif cfg.model.family.federation == EMBEDDING:
            result = release_summary(site, cfg, server_round=server_round)
        else:
            gen_state, disc_state = split_model(tensors_in)
            result = run_local_round(
                site,
                cfg,
                server_round=server_round,
                global_generator=gen_state,
                global_discriminator=disc_state or None,
                hospitals_asked=asked,
            )
    except Exception as err:
        # Flower reports a ClientApp's exception by node id only: name the hospital.
        raise RuntimeError(
            f"{site.name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    hospital: dict[str, Any] = {"name": site.name}
    metrics: dict[str, Any] = {}
    if result.privacy is not None:
        privacy = dict(result.privacy)
        hospital["dp-unit"] = privacy.pop("dp-unit")
        metrics.update(privacy)
    if result.release is not None and result.release_metrics is not None:
        metrics.update(result.release_metrics)
        content = RecordDict(
            {
                ARRAYS: tensors_to_record({f"{RELEASE}.{k}": v for k, v in result.release.items()}),
                METRICS: MetricRecord(metrics),
                HOSPITAL: ConfigRecord(hospital),
            }
        )
        return Message(content=content, reply_to=msg)
    declined = result.declined is not None or result.generator is None or result.stats is None
    if declined:
        hospital["declined"] = result.declined or "declined"
    if secure:
        local = None
        if not declined:
            metrics.update(result.stats.as_metrics())  # type: ignore[union-attr]
            local = {k: v.numpy() for k, v in _model_tensors(result).items()}
        try:
            return secure_reply(
                msg,
                global_model,
                local,
                metrics=metrics,
                info=hospital,
                config=config,
                max_update_norm=cfg.federation.max_update_norm,
            )
        except ValueError as err:
            raise RuntimeError(f"{site.name}: {err}") from err
    if declined:
        # A hospital that declines sends no weights, only why (and what it has spent).
        return Message(
            content=RecordDict({METRICS: MetricRecord(metrics), HOSPITAL: ConfigRecord(hospital)}),
            reply_to=msg,
        )
    metrics.update(result.stats.as_metrics())  # type: ignore[union-attr]
    content = RecordDict(
        {
            ARRAYS: tensors_to_record(_model_tensors(result)),
            METRICS: MetricRecord(metrics),
            HOSPITAL: ConfigRecord(hospital),
        }
    )
    return Message(content=content, reply_to=msg)


def _model_tensors(result: LocalRoundResult) -> dict[str, torch.Tensor]:
    """The round's weights by model tensor name: the generator's, and the discriminator's
    when the run aggregates it."""
    assert result.generator is not None
    tensors = {f"{GENERATOR}.{k}": v for k, v in result.generator.items()}
    if result.discriminator is not None:
        tensors.update({f"{DISCRIMINATOR}.{k}": v for k, v in result.discriminator.items()})
    return tensors


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global generator on this hospital's validation slices; only
    the score (and how many slices it rests on) leaves."""
    cfg = RunConfig.from_run_config(context.run_config)
    site = site_from_context(context, cfg)
    gen_state, _ = split_model(record_to_tensors(msg.content.array_records[ARRAYS]))
    try:
        scores = score_validation(site, cfg, gen_state)
    except Exception as err:
        raise RuntimeError(
            f"{site.name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return Message(
        content=RecordDict({METRICS: MetricRecord(scores), HOSPITAL: ConfigRecord({"name": site.name})}),
        reply_to=msg,
    )
