"""Prefect tasks of the screening flow around the chunks: the model, what is new, dead runs, outputs."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from prefect import get_run_logger, task

from model.bundle import ModelCard
from tasks.retrying import transient_only
from tasks import ledger, registry, reports, runs
from tasks.results import ResultsLayout, RunSummary, entry_key

__all__ = ["new_run_id", "not_yet_screened", "recover_abandoned_runs", "resolve_model", "write_run_outputs"]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def resolve_model(model_store_uri: str, model_version: str) -> ModelCard:
    """The card of the version to use; refuses a bundle this code cannot reproduce."""
    card = registry.load_card(model_store_uri, model_version)
    card.spec()  # raises BundleError for preprocessing this code does not implement
    return card


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def not_yet_screened(results_uri: str, model_version: str, inputs: Sequence[str]) -> list[str]:
    """The inputs this model version has no ledger entry for (one listing, no reads)."""
    done = ledger.done_keys(results_uri, model_version)
    return [uri for uri in inputs if entry_key(uri) not in done]


@task(retries=3, retry_delay_seconds=10, retry_condition_fn=transient_only)
def write_run_outputs(results_uri: str, summary: RunSummary, card: ModelCard) -> RunSummary:
    """Predictions, summary, report and artifacts from every row the run claimed; then its lease goes."""
    rows = reports.read_run_rows(results_uri, summary.run_id, card)
    summary = reports.write_outputs(results_uri, rows, card, summary.tally(rows, card.classes, card.threshold))
    reports.publish_artifacts(summary, rows, card)
    runs.close_run(results_uri, summary.run_id)
    return summary


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def recover_abandoned_runs(results_uri: str, run_id: str, after_minutes: float = 30.0) -> list[str]:
    """Writes the outputs of runs that died without writing them (their leases went stale).

    Their rows are in the ledger already, so no input is screened twice; this only makes them
    reach a predictions file and a report, under the dead run's own folder, with status
    ``abandoned``. Two runs recovering the same dead run write the same rows.
    """
    logger = get_run_logger()
    recovered = []
    for dead in runs.abandoned_runs(results_uri, timedelta(minutes=after_minutes)):
        try:
            card = registry.load_card(dead.model_store_uri, dead.model_version)
        except Exception as error:  # noqa: BLE001 - one unreadable model must not stop tonight's run
            logger.error("Run %s died without writing its outputs, and its model card cannot be read (%s); "
                         "its lease %s is left for a later run", dead.run_id, error,
                         ResultsLayout(results_uri).lease(dead.run_id))
            continue
        dead.status, dead.recovered_by, dead.recovered_at, dead.seconds = "abandoned", run_id, now(), None
        rows = reports.read_run_rows(results_uri, dead.run_id, card)
        summary = reports.write_outputs(results_uri, rows, card, dead.tally(rows, card.classes, card.threshold))
        runs.close_run(results_uri, dead.run_id)
        _mark_crashed(dead.flow_run_id, f"Abandoned: no sign of life since {dead.last_seen_at}; "
                                        f"its {len(rows)} screened rows were published by run {run_id}")
        logger.warning("Run %s died at about %s without writing its outputs; its %d screened rows are now in %s",
                       dead.run_id, dead.last_seen_at, len(rows), summary.outputs["predictions.csv"])
        recovered.append(dead.run_id)
    return recovered


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
