"""``cxr-screen drift accept RUN_ID``: a person accepts a run's drift alarm, so that its night joins
the drift reference of the nights after it (screening/drift.py). For a change that is understood
and here to stay (a new scanner, a new ward): until it is accepted, every night like it alarms."""

from __future__ import annotations

import getpass

import typer
from rich.markup import escape

from cli.exits import clean_errors
from cli.output import console

__all__ = ["drift_app"]

drift_app = typer.Typer(help="Drift alarms of screening runs: accept one that is understood.", no_args_is_help=True)


@drift_app.command("accept")
def accept(run_id: str = typer.Argument(..., help="The run whose drift alarm is accepted."),
           results: str = typer.Option("results", "--results", envvar="CXR_RESULTS",
                                       help="Results location (folder or s3://) of the run."),
           note: str = typer.Option("", "--note", help="Why: kept beside the acceptance."),
           by: str = typer.Option("", "--by", help="Who accepts (default: the user running this).")) -> None:
    """Let an alarmed run's night join the drift reference of later runs."""
    from screening import drift
    from store import storage

    with clean_errors():
        where = drift.accept(storage.join(results), run_id, by or getpass.getuser(), note)
    console.print(f"Accepted the drift of run {escape(run_id)}: its night joins the reference of later runs "
                  f"({escape(where)}).")
