"""The ``cxr-screen`` command line: one sub-command per job, each in its own module of ``cli``.

This module is the entry point (``cxr-screen = "cli.main:app"``): it makes the process' settings
before anything imports Prefect or TensorFlow, then registers the commands. Exit codes: 2 usage,
3 input or configuration, 1 anything else (``cli.exits``)."""

from __future__ import annotations

from cli import bootstrap

bootstrap()  # before Prefect or TensorFlow is imported anywhere

import typer  # noqa: E402

from cli.dataset import dataset  # noqa: E402
from cli.deliveries import deliveries  # noqa: E402
from cli.demo import demo  # noqa: E402
from cli.drift import drift_app  # noqa: E402
from cli.evaluate import evaluate  # noqa: E402
from cli.exits import EXIT_INPUT, EXIT_RUNTIME, EXIT_USAGE  # noqa: E402
from cli.ledger import ledger_app  # noqa: E402
from cli.models import models_app  # noqa: E402
from cli.output import console  # noqa: E402
from cli.report_link import report_link  # noqa: E402
from cli.screen import screen  # noqa: E402
from cli.stack_commands import dataset_updated, deploy, retrain, stack_app  # noqa: E402
from cli.synthesize import synthesize  # noqa: E402
from cli.train import audit, train  # noqa: E402
from cli.validate_engines import validate_engines  # noqa: E402

__all__ = ["EXIT_INPUT", "EXIT_RUNTIME", "EXIT_USAGE", "app", "console"]

app = typer.Typer(
    help="Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"cxr-screen {version('cxr-screen')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect."""


# In the order 'cxr-screen --help' lists them.
for command in (dataset, train, synthesize, screen, audit, evaluate):
    app.command()(command)
app.command("report-link")(report_link)
app.command()(deliveries)
app.command("validate-engines")(validate_engines)
app.command()(demo)
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
app.add_typer(ledger_app, name="ledger")
app.add_typer(drift_app, name="drift")
app.command()(deploy)
app.command()(retrain)
app.command("dataset-updated")(dataset_updated)

if __name__ == "__main__":
    app()
