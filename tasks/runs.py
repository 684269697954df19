"""Run leases: how a screening run that died without a word (SIGKILL, out of memory, power loss)
is noticed, so that the rows it screened still reach a report.

A lease (``ResultsLayout.lease``) is written when a run starts, renewed while it works and removed
once its outputs are written. It holds the run's summary so far. A run whose lease has not been
renewed for ``ABANDONED_AFTER`` is taken for dead. Every row it claimed is in the ledger and every
chunk it started recorded its inputs first, so a later run can write the dead run's outputs
exactly (see ``reports.read_run_rows``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

from tasks import storage
from tasks.results import ResultsLayout, RunSummary

__all__ = ["ABANDONED_AFTER", "abandoned_runs", "close_run", "open_run", "renew"]

# A live run renews its lease about once a minute while it screens, and a batch takes seconds; the
# next nightly run comes hours later, so a long margin costs nothing.
ABANDONED_AFTER = timedelta(minutes=30)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_run(results_uri: str, summary: RunSummary) -> None:
    """Writes the lease of a starting run. Its summary (model, incoming location...) lets a later
    run write this run's outputs should it die: locations in it must be absolute."""
    lease = {**summary.to_dict(), "renewed_at": _now()}
    storage.write_bytes(ResultsLayout(results_uri).lease(summary.run_id), json.dumps(lease, indent=2).encode())


def renew(results_uri: str, run_id: str) -> None:
    """Marks the run alive now. A lease already closed (the run's outputs are written) stays closed."""
    uri = ResultsLayout(results_uri).lease(run_id)
    try:
        lease = json.loads(storage.read_bytes(uri))
    except storage.NotFound:
        return
    lease["renewed_at"] = _now()
    storage.write_bytes(uri, json.dumps(lease, indent=2).encode())


def close_run(results_uri: str, run_id: str) -> None:
    storage.delete(ResultsLayout(results_uri).lease(run_id))


def abandoned_runs(results_uri: str, after: timedelta = ABANDONED_AFTER) -> list[RunSummary]:
    """Summaries of runs that died before writing their outputs (leases not renewed for ``after``),
    with ``last_seen_at`` set to their last renewal."""
    layout = ResultsLayout(results_uri)
    cutoff = datetime.now(timezone.utc) - after
    dead = []
    for uri in storage.list_files(layout.leases, {".json"}, missing_ok=True):
        try:
            lease = json.loads(storage.read_bytes(uri))
            renewed = datetime.fromisoformat(lease["renewed_at"])
            summary = RunSummary.from_dict(lease)
            if layout.lease(summary.run_id) != uri:
                raise ValueError(f"its run id {summary.run_id!r} does not match its name")
        except storage.NotFound:
            continue  # closed between the listing and the read
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            # Blocking every later run on one damaged file would be worse than leaving it to a person.
            logging.getLogger(__name__).error("%s is not a run lease (%s); left for an operator", uri, error)
            continue
        if renewed < cutoff:
            summary.last_seen_at = lease["renewed_at"]
            dead.append(summary)
    return dead
