"""Run leases: how a screening run that died without a word (SIGKILL, out of memory, power loss)
is noticed, so that the rows it screened still reach a report.

    <results>/open-runs/<run id>.json   written when a run starts, renewed while it works,
                                        removed once its outputs are written

A run whose lease has not been renewed for ``ABANDONED_AFTER`` is taken for dead. Every row it
claimed is in the ledger and every chunk it started recorded its inputs first, so a later run can
write the dead run's outputs exactly (see ``reports.read_run_rows``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

from tasks import storage

__all__ = ["ABANDONED_AFTER", "abandoned_runs", "close_run", "lease_uri", "open_run", "renew"]

# A live run renews its lease about once a minute while it screens, and a batch takes seconds; the
# next nightly run comes hours later, so a long margin costs nothing.
ABANDONED_AFTER = timedelta(minutes=30)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lease_uri(results_uri: str, run_id: str) -> str:
    return storage.join(results_uri, "open-runs", f"{run_id}.json")


def open_run(results_uri: str, run_id: str, **facts) -> None:
    """Writes the lease of a starting run; ``facts`` (model, incoming location...) let a later run
    write this run's summary should it die."""
    lease = {"run_id": run_id, **facts, "renewed_at": _now()}
    storage.write_bytes(lease_uri(results_uri, run_id), json.dumps(lease, indent=2).encode())


def renew(results_uri: str, run_id: str) -> None:
    """Marks the run alive now. A lease already closed (the run's outputs are written) stays closed."""
    uri = lease_uri(results_uri, run_id)
    try:
        lease = json.loads(storage.read_bytes(uri))
    except storage.NotFound:
        return
    lease["renewed_at"] = _now()
    storage.write_bytes(uri, json.dumps(lease, indent=2).encode())


def close_run(results_uri: str, run_id: str) -> None:
    storage.delete(lease_uri(results_uri, run_id))


def abandoned_runs(results_uri: str, after: timedelta = ABANDONED_AFTER) -> list[dict]:
    """Leases not renewed for ``after``: runs that died before writing their outputs."""
    uris = list(storage.list_files(storage.join(results_uri, "open-runs"), {".json"}, missing_ok=True))
    cutoff = datetime.now(timezone.utc) - after
    dead = []
    for uri in uris:
        try:
            lease = json.loads(storage.read_bytes(uri))
            renewed = datetime.fromisoformat(lease["renewed_at"])
        except storage.NotFound:
            continue  # closed between the listing and the read
        except (ValueError, TypeError, KeyError) as error:
            # Blocking every later run on one damaged file would be worse than leaving it to a person.
            logging.getLogger(__name__).error("%s is not a run lease (%r); left for an operator", uri, error)
            continue
        if renewed < cutoff:
            dead.append(lease)
    return dead
