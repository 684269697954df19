"""``cxr-screen drift accept RUN_ID``: a person accepts a run's drift alarm, so that its night joins
the drift reference of the nights after it (screening/drift.py). For a change that is understood
and here to stay (a new scanner, a new ward): until it is accepted, every night like it alarms.
``cxr-screen drift resume``: resume the nightly deployment an alarm paused (CXR_PAUSE_ON_DRIFT)."""

from __future__ import annotations

import getpass

import typer
from rich.markup import escape

from cli.exits import clean_errors
from cli.output import console

__all__ = ["drift_app"]

drift_app = typer.Typer(help="Drift alarms of screening runs: accept one that is understood, resume nightly screening.",
                        no_args_is_help=True)


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
        where, caveat = drift.accept(storage.join(results), run_id, by or _user(), note)
    if caveat:
        console.print(f"[yellow]Accepted the drift of run {escape(run_id)} ({escape(where)}), but its night cannot join "
                      f"the reference: {escape(caveat)}.[/yellow]")
    else:
        console.print(f"Accepted the drift of run {escape(run_id)}: its night joins the reference of later runs "
                      f"({escape(where)}).")


@drift_app.command("resume")
def resume() -> None:
    """Resume the nightly-screening deployment a drift alarm paused (CXR_PAUSE_ON_DRIFT=true)."""
    from cli.stack_commands import require_prefect_api

    require_prefect_api()
    from prefect.client.orchestration import get_client

    from deployments.deploy import SCREENING

    with clean_errors(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(SCREENING)
        if not deployment.paused:
            console.print(f"{SCREENING} is not paused.")
            return
        client.resume_deployment(deployment.id)
    console.print(f"Resumed {SCREENING}: its schedule runs again.")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's user without a name
        return "unknown"
