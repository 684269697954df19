"""``cxr-screen deliveries RESULTS``: where PACS images' DICOM results stand (screening/delivery.py):
each open one, pending (sent again by the next run) or dead (failed on too many runs; ``--retry``
gives them to the next runs again), and how many were delivered. Exit codes: 0 nothing dead, 1 some
dead, 3 a location that cannot be read."""

from __future__ import annotations

from collections import Counter

import typer
from rich.markup import escape
from rich.table import Table

from cli.exits import clean_errors
from cli.output import JSON_OPTION, console, json_mode, print_json

__all__ = ["deliveries"]


def deliveries(results: str = typer.Argument(..., help="Results location (folder or s3://)."),
               retry: bool = typer.Option(False, "--retry", help="Give every dead delivery to the next runs again."),
               as_json: bool = JSON_OPTION) -> None:
    """PACS images' DICOM results not delivered yet (pending or dead, with the last error), and how many were."""
    from screening import delivery
    from store import storage

    json_mode(as_json)
    with clean_errors():
        location = storage.join(results)
        revived = delivery.retry_dead(location) if retry else 0
        found = delivery.entries(location)
        counts = Counter(entry.status for _, entry in found)
        counts["delivered"] += delivery.delivered_count(location)
    if as_json:
        print_json({"results": results, "revived": revived, "counts": dict(counts),
                    "deliveries": [{"model_version": version, **vars(entry)} for version, entry in found]})
    else:
        table = Table("status", "SOP Instance UID", "model", "objects", "attempts", "nights", "last error")
        for version, entry in sorted(found, key=lambda item: (item[1].status != "dead", item[1].status)):
            table.add_row(entry.status, entry.sop_instance_uid, version, ", ".join(entry.objects), str(entry.attempts),
                          str(entry.nights), escape(entry.last_error))
        if found:
            console.print(table)
        if revived:
            console.print(f"{revived} dead deliveries go to the next runs again.")
        console.print(", ".join(f"{counts[status]} {status}" for status in ("delivered", "pending", "dead"))
                      + f" (in {escape(results)})")
    if counts["dead"]:
        raise typer.Exit(code=1)
