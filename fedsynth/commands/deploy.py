"""Deployment across institutions: `fedsynth server`, `fedsynth client`, `fedsynth run`.

The coordinator runs ``fedsynth server`` (a Flower SuperLink with TLS and SuperNode
authentication), admits each hospital with ``fedsynth server register-hospital``, and
launches runs with ``fedsynth run``. Each hospital runs ``fedsynth client`` (a Flower
SuperNode reading only its own slice set). See docs/deployment.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from fedsynth.commands.common import (
    FORMAT_HELP,
    CommandError,
    OutputFormat,
    console,
    echo_json,
    interrupt_on_sigterm,
    setup_logging,
    user_errors,
)
from fedsynth.commands.progress import run_with_progress
from fedsynth.engine.deployment import (
    DEFAULT_PORT,
    Coordinator,
    DeploymentError,
    create_run,
    run_deployment,
)
from fedsynth.engine.launcher import EngineError
from fedsynth.engine.supernode import RETRY_SECONDS, prepare_node, run_node
from fedsynth.runs.config import RunConfig, parse_overrides
from fedsynth.runs.rundir import RunDir

__all__ = ["client", "register_hospital", "run", "server", "server_app"]

HOME_HELP = "The coordinator's folder (settings, hospital register, SuperLink state and logs)."
DEFAULT_HOME = Path("fedsynth-coordinator")

server_app = typer.Typer(no_args_is_help=False, add_completion=False)


@server_app.callback(invoke_without_command=True)
@user_errors
def server(
    ctx: typer.Context,
    certs: Path = typer.Option(
        None, "--certs", help="Folder with ca.crt, server.pem and server.key (from deploy/make-certs.sh)."
    ),
    host: str = typer.Option("0.0.0.0", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(DEFAULT_PORT, help="The one TCP port hospitals connect to (HTTPS)."),
    home: Path = typer.Option(DEFAULT_HOME, "--home", help=HOME_HELP),
) -> None:
    """Start the coordinator's SuperLink (TLS, only registered hospitals admitted).

    Runs in the foreground until stopped (Ctrl-C). Its state (registered hospitals, runs)
    is kept in --home, so a restarted server knows its hospitals again. Then admit
    hospitals with `fedsynth server register-hospital NAME KEY.pub` and launch runs with
    `fedsynth run`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if certs is None:
        raise CommandError("--certs DIR is required (make the certificates with deploy/make-certs.sh)")
    coordinator = Coordinator(home)
    command = coordinator.superlink_command(certs, host=host, port=port)
    registered = coordinator.registry()
    console.print(
        f"SuperLink on https://{host}:{port} (TLS, SuperNode authentication); home {coordinator.home}"
    )
    console.print(f"  registered hospitals: {', '.join(registered) if registered else 'none yet'}")
    console.print(
        "  admit one:  fedsynth server register-hospital NAME hospital.key.pub"
        + (f" --home {home}" if home != DEFAULT_HOME else "")
    )
    console.print(
        "  launch:     fedsynth run --config run.yaml --out runs/NAME"
        + (f" --home {home}" if home != DEFAULT_HOME else "")
    )
    console.print(f"  logs:       {coordinator.log_path}  (Ctrl-C stops the server)")
    sys.stdout.flush()
    # Become the SuperLink: a signal to this process (Ctrl-C, a service manager's stop)
    # reaches Flower directly.
    os.execve(command[0], command, coordinator.env())


@server_app.command("register-hospital")
@user_errors
def register_hospital(
    name: str = typer.Argument(
        ..., help="The hospital's name, as it will appear in every record (e.g. north)."
    ),
    public_key: Path = typer.Argument(
        ..., help="The hospital's public key (hospital.key.pub, ECDSA, OpenSSH format)."
    ),
    home: Path = typer.Option(DEFAULT_HOME, "--home", help=HOME_HELP),
) -> None:
    """Admit a hospital: register its SuperNode public key with the running server."""
    with console.status("registering (waiting up to 30 s for the server if it is still starting)"):
        node_id = Coordinator(home).register(name, public_key)
    console.print(
        f"registered [bold]{name}[/] (SuperNode {node_id}); it can now connect with `fedsynth client`"
    )


@server_app.command("hospitals")
@user_errors
def hospitals(
    home: Path = typer.Option(DEFAULT_HOME, "--home", help=HOME_HELP),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help=FORMAT_HELP),
) -> None:
    """List the registered hospitals and whether each SuperNode is online."""
    rows = Coordinator(home).hospitals()
    if output_format is OutputFormat.json:
        echo_json({"hospitals": rows})
        return
    table = Table(title="registered hospitals", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("hospital", no_wrap=True)  # kept whole where they fit; --format json always
    table.add_column("SuperNode", no_wrap=True)
    for column in ("status", "online since", "registered"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["hospital"], row["node_id"], row["status"], row["online_at"], row["registered"])
    console.print(table if rows else "no hospitals registered yet")


@user_errors
def client(
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's address, HOST:PORT."),
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help="This hospital's slice set (.npz from `fedsynth prepare`). Never leaves the hospital.",
    ),
    ca_cert: Path = typer.Option(..., "--ca-cert", help="The consortium's CA certificate (ca.crt)."),
    key: Path = typer.Option(
        ..., "--key", help="This hospital's private key (its .pub is registered at the coordinator)."
    ),
    name: str = typer.Option(
        None, "--name", help="Name shown in this hospital's logs [default: the key file's name]."
    ),
    state_dir: Path = typer.Option(
        None,
        "--state-dir",
        help="Local training state and privacy ledger [default: fedsynth-state beside --data].",
    ),
    target_epsilon: float = typer.Option(
        None,
        "--dp.target-epsilon",
        help="This hospital's privacy budget (DP-SGD on its discriminator); overrides the run's.",
    ),
    delta: float = typer.Option(
        None, "--dp.delta", help="This hospital's delta (default: min(1e-5, 1/(10 N)))."
    ),
    max_grad_norm: float = typer.Option(None, "--dp.max-grad-norm", help="Per-sample clipping norm."),
    port: int = typer.Option(
        9094,
        "--port",
        help="Local port of the SuperNode's ClientApp API (127.0.0.1 only; change it to run two on one "
        "machine).",
    ),
    max_wait: float = typer.Option(
        0.0, "--max-wait", help="Give up after this many seconds without the coordinator (0: keep trying)."
    ),
) -> None:
    """Start this hospital's SuperNode: train on local slices when the coordinator asks.

    Only model weights and scalar metrics leave the hospital; the slices, the
    discriminator and the privacy ledger stay here. Runs in the foreground (Ctrl-C stops it)
    and reconnects by itself if the coordinator restarts; while the coordinator does not
    accept this hospital's key (not registered yet, or still holding the connection of a
    machine that went down) it tries again every 10 seconds.
    """
    dp = {
        k: v
        for k, v in (
            ("dp.target-epsilon", target_epsilon),
            ("dp.delta", delta),
            ("dp.max-grad-norm", max_grad_norm),
        )
        if v is not None
    }
    node = prepare_node(
        superlink=superlink,
        data=data,
        ca_cert=ca_cert,
        key=key,
        name=name,
        state_dir=state_dir,
        dp=dp,
        port=port,
        max_wait=max_wait,
    )
    s = node.summary
    console.print(f"hospital [bold]{s['hospital']}[/] -> {s['superlink']} (TLS, authenticated with {key})")
    console.print(
        f"  data: {s['data']} ({s['train']} training slices of {s['slices']}, {s['image_size']} px, classes "
        f"{', '.join(s['classes'])})"
    )
    console.print(
        f"  privacy: {', '.join(f'{k}={v}' for k, v in s['privacy'].items()) or 'as the run config says'}"
    )
    console.print(f"  local state and privacy ledger: {s['state_dir']}")
    console.print("  leaves this hospital: generator weights and scalar metrics only")
    sys.stdout.flush()

    def refused(attempt: int) -> None:
        if attempt == 1:
            console.print(
                "the coordinator did not accept this hospital's key: either it is not registered yet (the "
                f"coordinator runs: fedsynth server register-hospital {s['hospital']} KEY.pub), or the "
                "coordinator still holds this hospital's previous connection (it lets go about a minute "
                f"after a machine goes down). Trying again every {RETRY_SECONDS:g} s; Ctrl-C stops.",
                soft_wrap=True,
            )
        else:
            console.print(f"still not accepted after {attempt} tries; trying again in {RETRY_SECONDS:g} s")

    interrupt_on_sigterm()
    try:
        code = run_node(node, max_wait=max_wait, on_refused=refused)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@user_errors
def run(
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML run config (see `fedsynth config`); must set data.image-size and data.class-names.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Run directory to create on this (the coordinator's) machine, or to continue with --resume.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key, e.g. --set federation.rounds=10 (repeatable)."
    ),
    resume: bool = typer.Option(
        False, help="Continue the run in --out from its last completed round (after a coordinator restart)."
    ),
    home: Path = typer.Option(DEFAULT_HOME, "--home", help=HOME_HELP),
    wait: float = typer.Option(
        60.0,
        "--wait",
        help="Seconds to wait for every registered hospital to be online before launching (then it goes on "
        "with those online).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fedsynth's progress messages."),
) -> None:
    """Launch a federated run on the coordinator's SuperLink and follow it round by round.

    Run it on the coordinator's machine: the ServerApp writes the run directory there
    (checkpoints, rounds.jsonl, privacy ledger, sample grids, messages.jsonl), exactly as
    `fedsynth simulate` does. The hospitals connected at the start of each round take part.
    """
    setup_logging(verbose)
    coordinator = Coordinator(home)
    settings = coordinator.settings()
    rundir = RunDir(out)
    overrides = parse_overrides(set_)
    if resume:
        if config is not None:
            raise CommandError("--resume continues with the run's saved config: drop --config")
        cfg = rundir.resume_config(overrides)
        console.print(f"resuming {rundir.root} after round {rundir.last_round()} of {cfg.federation.rounds}")
    else:
        cfg = RunConfig.from_yaml(config, overrides) if config else RunConfig.from_overrides(overrides)
        cfg = create_run(cfg, rundir, coordinator)
    console.print(
        f"SuperLink {settings['address']}; registered hospitals: "
        f"{', '.join(sorted(coordinator.registry())) or 'none'}"
    )
    offline = _wait_for_hospitals(coordinator, wait)
    if offline:
        console.print(
            f"[yellow]not online after {wait:.0f} s:[/] {', '.join(offline)}; launching with the others (a "
            "hospital that connects later joins the next round)"
        )
    try:
        ok = run_with_progress(
            cfg,
            rundir,
            lambda on_poll: run_deployment(cfg, rundir, coordinator, on_poll=on_poll),
            starting="waiting for the SuperLink and the hospitals",
            resume=f"fedsynth run --out {rundir.root} --resume"
            + (f" --home {home}" if home != DEFAULT_HOME else ""),
        )
    except (EngineError, DeploymentError) as err:
        raise CommandError(str(err)) from None
    if not ok:
        raise typer.Exit(1)


def _wait_for_hospitals(coordinator: Coordinator, wait: float) -> list[str]:
    """Wait up to ``wait`` s for every registered hospital's SuperNode to be online;
    return those still offline."""
    deadline = time.monotonic() + wait
    with console.status("waiting for the registered hospitals to connect") as status:
        while True:
            rows = coordinator.hospitals()
            offline = [r["hospital"] for r in rows if r["status"] != "online"]
            if not offline or time.monotonic() > deadline:
                return offline
            status.update(
                f"waiting for {', '.join(offline)} to connect ({deadline - time.monotonic():.0f} s left)"
            )
            time.sleep(2)
