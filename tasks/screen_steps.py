"""Prefect tasks of the screening flow around the chunks: the model, what is new, dead runs, outputs."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from datetime import timedelta

from prefect import get_run_logger, task

from model.bundle import ModelCard
from screening import leases, ledger, reports
from screening.results import ResultsLayout, RunSummary, entry_key
from store import evaluations, registry
from store.clock import utc_now, utc_timestamp
from tasks.retrying import io_step

__all__ = ["flow_run_finished", "new_run_id", "not_yet_screened", "recover_abandoned_runs", "resolve_model",
           "write_run_outputs"]

_logger = logging.getLogger(__name__)  # for helpers that may run outside a Prefect task


def new_run_id() -> str:
    return utc_now().strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


@task(**io_step())
def resolve_model(model_store_uri: str, model_version: str) -> ModelCard:
    """The card of the version to use; refuses a bundle this code cannot reproduce, one whose
    files are not those its card lists (model.keras is checked where it is loaded), and, with
    CXR_REQUIRE_EVALUATION=true, one without a passing site evaluation (store/evaluations.py)."""
    card = registry.verify_bundle(model_store_uri, model_version, include_model=False)
    card.spec()  # raises BundleError for preprocessing this code does not implement
    if evaluations.evaluation_required():
        evaluations.require_passing(model_store_uri, card)
    return card


@task(**io_step())
def not_yet_screened(results_uri: str, model_version: str, inputs: Sequence[str]) -> list[str]:
    """The inputs this model version has no ledger entry for (one listing, no reads)."""
    done = ledger.done_keys(results_uri, model_version)
    return [uri for uri in inputs if entry_key(uri) not in done]


@task(**io_step(retries=3))
def write_run_outputs(results_uri: str, summary: RunSummary, card: ModelCard) -> RunSummary:
    """Predictions, summary, report and artifacts from every row the run claimed; then its lease goes."""
    rows = reports.read_run_rows(results_uri, summary.run_id, card)
    summary = reports.write_outputs(results_uri, rows, card, summary.tally(rows, card.classes, card.threshold))
    reports.publish_artifacts(summary, rows, card)
    leases.close_run(results_uri, summary.run_id)
    return summary


@task(**io_step())
def recover_abandoned_runs(results_uri: str, run_id: str, after_minutes: float) -> list[str]:
    """Writes the outputs of runs that died without writing them: their leases went stale, or
    their flow runs ended (Failed, Crashed, Cancelled, Completed) with the lease still open.

    Their rows are in the ledger already, so no input is screened twice; this only makes them
    reach a predictions file and a report, under the dead run's own folder, with status
    ``abandoned``. Two runs recovering the same dead run write the same rows. A dead run that
    cannot be recovered (unreadable card, damaged files) is logged and its lease left.
    """
    logger = get_run_logger()
    recovered = []
    for dead in leases.abandoned_runs(results_uri, timedelta(minutes=after_minutes), finished=flow_run_finished,
                                    current_run_id=run_id):
        try:
            rows = _recover(results_uri, dead, run_id)
        except (ValueError, OSError) as error:  # BundleError, LedgerError, StorageError: this run, not tonight's
            logger.error("Run %s died without writing its outputs, and they cannot be written now (%s); "
                         "its lease %s is left for a later run", dead.run_id, error,
                         ResultsLayout(results_uri).lease(dead.run_id))
            continue
        _mark_crashed(dead.flow_run_id, f"Abandoned: no sign of life since {dead.last_seen_at}; "
                                        f"its {rows} screened rows were published by run {run_id}")
        logger.warning("Run %s died at about %s without writing its outputs; its %d screened rows are now in %s",
                       dead.run_id, dead.last_seen_at, rows, dead.outputs["predictions.csv"])
        recovered.append(dead.run_id)
    return recovered


def _recover(results_uri: str, dead: RunSummary, run_id: str) -> int:
    """Writes a dead run's outputs from its rows and closes its lease; returns its row count."""
    card = registry.load_card(dead.model_store_uri, dead.model_version)
    dead.status, dead.recovered_by, dead.recovered_at, dead.seconds = "abandoned", run_id, utc_timestamp(), None
    rows = reports.read_run_rows(results_uri, dead.run_id, card)
    summary = reports.write_outputs(results_uri, rows, card, dead.tally(rows, card.classes, card.threshold))
    dead.outputs = summary.outputs
    leases.close_run(results_uri, dead.run_id)
    return len(rows)


def flow_run_finished(flow_run_id: str) -> bool:
    """Whether Prefect has this flow run in a final state (Completed, Failed, Crashed, Cancelled):
    then its process is done and cannot still be writing. False when Prefect cannot say (another
    server, an API that is down, a run it does not know), so the lease's age decides."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except (ObjectNotFound, httpx.HTTPError, OSError) as error:
        _logger.info("Prefect cannot say how flow run %s ended (%r): its lease's age decides", flow_run_id, error)
        return False
    return state is not None and state.is_final()


def _mark_crashed(flow_run_id: str | None, message: str) -> None:
    """Shows the dead run as Crashed in the Prefect UI, where it would otherwise stay Running."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            if not client.read_flow_run(flow_run_id).state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception as error:  # noqa: BLE001 - the UI state is a courtesy; the outputs are what matter
        get_run_logger().warning("Could not mark flow run %s as crashed: %s", flow_run_id, error)
