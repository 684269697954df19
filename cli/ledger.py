"""``cxr-screen ledger check RESULTS``: audits a results location's ledger against its published
runs, so that an operator can tell whether anyone changed the store (screening/ledger.py).

Prints one line per problem: damaged entries (not a row, or not the row of the input and model its
name says), orphan entries (their run is neither open nor publishes their row: such an input is
screened again by the next run), and missing ones (a published, claimed row whose entry is gone or
names another run). Exit codes: 0 clean, 1 any problem found, 3 a location that cannot be read.
"""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.progress import Progress

from cli.exits import clean_errors
from cli.output import JSON_OPTION, console, json_mode, print_json

__all__ = ["ledger_app"]

ledger_app = typer.Typer(help="The screening ledger: audit it against the published runs.", no_args_is_help=True)


@ledger_app.command("check")
def check(results: str = typer.Argument(..., help="Results location (folder or s3://) to audit."),
          as_json: bool = JSON_OPTION) -> None:
    """Reconcile the ledger with the published rows: damaged entries, orphan entries, missing entries."""
    from screening import ledger
    from store import storage

    json_mode(as_json)
    with clean_errors(), Progress(console=console, transient=True) as progress:
        task = progress.add_task("Reading ledger entries", total=None)
        found = ledger.reconcile(storage.join(results), lambda done, total: progress.update(task, completed=done,
                                                                                             total=total))
    if as_json:
        print_json({"results": results, "entries": found.entries, "published_rows": found.published_rows,
                    "damaged": found.damaged, "orphans": found.orphans, "missing": found.missing, "clean": found.clean})
    else:
        for kind, lines in (("damaged", found.damaged), ("orphan", found.orphans), ("missing", found.missing)):
            for line in lines:
                console.print(f"[red]{kind}:[/red] {escape(line)}", soft_wrap=True)
        verdict = "clean" if found.clean else (f"{len(found.damaged)} damaged, {len(found.orphans)} orphan, "
                                              f"{len(found.missing)} missing")
        console.print(f"{found.entries} ledger entries, {found.published_rows} published rows: {verdict}")
    if not found.clean:
        raise typer.Exit(code=1)
