"""The `fedsynth` command: registers the sub-commands; no logic of its own."""

from __future__ import annotations

import typer

from fedsynth.commands.audit import audit
from fedsynth.commands.common import interrupt_on_sigterm
from fedsynth.commands.demo import demo
from fedsynth.commands.deploy import client, run, server, server_app
from fedsynth.commands.info import config, models
from fedsynth.commands.prepare import prepare
from fedsynth.commands.report import consortium, report
from fedsynth.commands.sample import sample
from fedsynth.commands.simulate import simulate
from fedsynth.commands.translate import translate
from fedsynth.commands.turing import make_sheet, turing_test

app = typer.Typer(
    name="fedsynth",
    help="Federated synthetic CT/MRI slices: train GANs across hospitals with Flower, without moving images.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.command(help=prepare.__doc__)(prepare)
app.command(help=simulate.__doc__)(simulate)
app.command(help=sample.__doc__)(sample)
app.command(help=translate.__doc__)(translate)
app.command(help=audit.__doc__)(audit)
app.command(help=report.__doc__)(report)
app.command(help=consortium.__doc__)(consortium)
app.command(help=demo.__doc__)(demo)
app.add_typer(server_app, name="server", help=server.__doc__)
app.command(help=client.__doc__)(client)
app.command(help=run.__doc__)(run)
app.command(help=models.__doc__)(models)
app.command(help=config.__doc__)(config)
app.add_typer(turing_test, name="turing-test", help=make_sheet.__doc__)


def main() -> None:
    interrupt_on_sigterm()
    app()


if __name__ == "__main__":
    main()
