"""Run leases: how a screening run that died without a word (SIGKILL, out of memory, power loss)
is noticed, so that the rows it screened still reach a report.

A lease (``ResultsLayout.lease``) is written when a run starts, renewed while it works and removed
once its outputs are written. It holds the run's summary so far. A run is taken for dead when its
lease has not been renewed for ``abandoned_runs``' ``after`` (the screen parameter
``abandoned_after_minutes``), or at once when its Prefect flow run is known to be over
(``abandoned_runs``' ``finished``). Every row it claimed is in the ledger
and every chunk it started recorded its inputs first, so a later run can write the dead run's
outputs exactly (see ``reports.read_run_rows``).

Leases are read back from shared storage and trusted no further than ``model.stored_json`` and
``RunSummary.from_dict`` check them: a damaged one is logged, reported in the run's summary and
left for an operator, never followed. What a valid-looking lease may make a run do is decided by
the recovering run (``tasks/screen_steps.py``): a lease can never reopen a published run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from model.stored_json import loads as load_json
from model.stored_json import reason
from screening.results import ResultsLayout, RunSummary
from store import storage
from store.clock import utc_now, utc_timestamp

__all__ = ["RENEW_EVERY_SECONDS", "abandoned_runs", "close_run", "kept_alive", "live_runs", "open_run", "renew",
           "renew_quietly"]

logger = logging.getLogger(__name__)

# A live run renews its lease about once a minute while it screens, and a batch takes seconds; the
# next nightly run comes hours later, so a long margin before a silent run is taken for dead costs nothing.
RENEW_EVERY_SECONDS = 60
MAX_LEASE_BYTES = 1 << 20  # a lease is a summary so far: a few kB
CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of ours another machine's clock may be


def open_run(results_uri: str, summary: RunSummary) -> None:
    """Writes the lease of a starting run. Its summary (model, incoming location...) lets a later
    run write this run's outputs should it die: locations in it must be absolute."""
    lease = {**summary.to_dict(), "renewed_at": utc_timestamp()}
    storage.write_bytes(ResultsLayout(results_uri).lease(summary.run_id), json.dumps(lease, indent=2).encode())


def renew(results_uri: str, run_id: str) -> None:
    """Marks the run alive now. A lease already closed (the run's outputs are written) stays closed."""
    uri = ResultsLayout(results_uri).lease(run_id)
    try:
        lease = load_json(storage.read_bytes(uri), uri)
    except storage.NotFound:
        return
    except ValueError as error:  # a missed renewal only risks an early recovery; a crash would lose the chunk
        logger.error("%s: not a run lease (%s); not renewed", uri, reason(error, uri))
        return
    if not isinstance(lease, dict):
        logger.error("%s: not a run lease (a JSON object was expected); not renewed", uri)
        return
    lease["renewed_at"] = utc_timestamp()
    storage.write_bytes(uri, json.dumps(lease, indent=2).encode())


def renew_quietly(results_uri: str, run_id: str) -> None:
    """``renew``, where a failure is only logged: one missed renewal is harmless, only a silence of
    the lease's whole margin counts, and failing the work for it would lose more than it saves."""
    try:
        renew(results_uri, run_id)
    except OSError as error:
        logger.warning("Could not renew the lease of run %s: %s", run_id, error)


@contextlib.contextmanager
def kept_alive(results_uri: str, run_id: str, every: float = RENEW_EVERY_SECONDS) -> Iterator[None]:
    """Renews the run's lease from a background thread while the block runs: chunks queued on a
    busy cluster renew nothing themselves, and a long queue must not look like a dead run."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            renew_quietly(results_uri, run_id)

    thread = threading.Thread(target=loop, name=f"lease-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def close_run(results_uri: str, run_id: str) -> None:
    storage.delete(ResultsLayout(results_uri).lease(run_id))


def abandoned_runs(results_uri: str, after: timedelta, *,
                   finished: Callable[[str], bool] = lambda flow_run_id: False,
                   current_run_id: str | None = None, damaged: list[str] | None = None) -> list[RunSummary]:
    """Summaries of runs that died before writing their outputs, with ``last_seen_at`` set to their
    last renewal: leases not renewed for ``after``, and leases whose flow run ``finished`` says is
    over (a final state in Prefect: it cannot still be writing). ``current_run_id``'s own lease is
    never among them. Leases that cannot be read as leases are appended to ``damaged``, each as
    "location: what is wrong"."""
    cutoff = utc_now() - after
    dead = []
    for uri in storage.list_files(ResultsLayout(results_uri).leases, {".json"}, missing_ok=True):
        lease = _read_lease(results_uri, uri, damaged if damaged is not None else [])
        if lease is None or lease[0].run_id == current_run_id:
            continue
        summary, renewed_at = lease
        if renewed_at < cutoff or (summary.flow_run_id and finished(summary.flow_run_id)):
            summary.last_seen_at = renewed_at.isoformat(timespec="seconds")
            dead.append(summary)
    return dead


def live_runs(results_uri: str, after: timedelta) -> set[str]:
    """Ids of the runs whose lease reads back valid and was renewed within ``after``: runs that may
    still be claiming inputs. A lease file's name alone proves nothing (``ledger.screened``)."""
    cutoff, live = utc_now() - after, set()
    for uri in storage.list_files(ResultsLayout(results_uri).leases, {".json"}, missing_ok=True):
        lease = _read_lease(results_uri, uri, [])
        if lease is not None and lease[1] >= cutoff:
            live.add(lease[0].run_id)
    return live


def _read_lease(results_uri: str, uri: str, damaged: list[str]) -> tuple[RunSummary, datetime] | None:
    """The lease at ``uri`` and its last renewal, or None when it is gone or not a valid lease."""
    try:
        lease = load_json(storage.read_bytes(uri, max_bytes=MAX_LEASE_BYTES), uri)
        summary = RunSummary.from_dict(lease)
        renewed_at = _renewal(lease.get("renewed_at"))
        if renewed_at > utc_now() + CLOCK_SKEW:  # it would never go stale, and its run never be recovered
            raise ValueError(f"renewed_at {renewed_at.isoformat()} is in the future")
        if ResultsLayout(results_uri).lease(summary.run_id) != uri:
            raise ValueError(f"its run id {summary.run_id!r} does not match its name")
    except storage.NotFound:
        return None  # closed between the listing and the read
    except (ValueError, storage.Unreadable) as error:  # JSON, schema, names and size alike
        # Blocking every later run on one damaged file would be worse than leaving it to a person.
        problem = f"{uri}: not a run lease ({reason(error, uri)}); left for an operator"
        logger.error("%s", problem)
        damaged.append(problem)
        return None
    return summary, renewed_at


def _renewal(value: object) -> datetime:
    """An aware time: a naive one could not be compared with now, and would end the whole listing."""
    try:
        renewed_at = datetime.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"renewed_at {value!r} is not an ISO 8601 time") from None
    if renewed_at.tzinfo is None:
        raise ValueError(f"renewed_at {value!r} has no time zone")
    return renewed_at
