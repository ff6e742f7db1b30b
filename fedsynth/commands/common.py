"""What every sub-command shares: the console, logging set-up and one-line user errors."""

from __future__ import annotations

import functools
import json
import logging
import signal
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fedsynth.audit.federated import ShareError
from fedsynth.core.checkpoint import CheckpointError
from fedsynth.core.errors import ConfigError, UserError
from fedsynth.data.ingest import IngestError
from fedsynth.data.partition import PartitionError
from fedsynth.data.sliceset import SliceSetError
from fedsynth.engine.deployment import DeploymentError
from fedsynth.engine.supernode import NodeError
from fedsynth.runs.rundir import RunDirError

__all__ = [
    "FORMAT_HELP",
    "USER_ERRORS",
    "CommandError",
    "OutputFormat",
    "console",
    "echo_json",
    "err_console",
    "setup_logging",
    "user_errors",
]

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(StrEnum):
    """How a listing command prints: a table for reading, JSON for scripts."""

    table = "table"
    json = "json"


FORMAT_HELP = "table (for reading) or json (for scripts: every value whole, whatever the terminal's width)."


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON on standard output (no rich markup, no wrapping)."""
    typer.echo(json.dumps(value, indent=2))


# A user-facing error raised by a command itself: the library's UserError, by the name the
# commands use (the library raises the same class, e.g. when a family cannot draw what is asked).
CommandError = UserError

USER_ERRORS: tuple[type[Exception], ...] = (
    UserError,
    ConfigError,
    SliceSetError,
    IngestError,
    PartitionError,
    RunDirError,
    CheckpointError,
    FileNotFoundError,
    ShareError,
    DeploymentError,
    NodeError,
)


def setup_logging(verbose: bool) -> None:
    """Warnings (or everything, with --verbose) from fedsynth's loggers to stderr."""
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    root = logging.getLogger("fedsynth")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def interrupt_on_sigterm() -> None:
    """SIGTERM (a service manager's or ``kill``'s stop) ends a command the way Ctrl-C
    does: the engine stops every process it started, and a run is marked interrupted
    with the command that resumes it."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def user_errors(func: F) -> F:
    """Show expected errors (bad input, bad config) as one red line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            # escaped: an error text is never markup ("pip install 'fedsynth[mlflow]'", a path with brackets)
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
