"""Nightly batch screening: new X-rays in, one prediction row each, reports out.

Steps: resolve the model version, publish the rows of earlier runs that died without writing
their outputs, list the incoming images, skip those this model version has already screened (the
ledger), screen the rest chunk by chunk, then write predictions, summary, report and Prefect
artifacts for this run, also when a chunk failed (then the run fails after).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from model.bundle import ModelCard
from tasks import ledger, registry, reports, runs, storage
from tasks.screening import chunked, find_inputs, screen_chunk

# Process-local listeners of (screened so far, to screen), for progress bars in the command line.
progress_listeners: list[Callable[[int, int], None]] = []


@task(retries=2, retry_delay_seconds=10)
def resolve_model(model_store_uri: str, model_version: str) -> ModelCard:
    """The card of the version to use; refuses a bundle this code cannot reproduce."""
    card = registry.load_card(model_store_uri, model_version)
    card.spec()  # raises BundleError for preprocessing this code does not implement
    return card


@task(retries=2, retry_delay_seconds=10)
def already_screened(results_uri: str, model_version: str) -> set[str]:
    return ledger.done_keys(results_uri, model_version)


@task(retries=3, retry_delay_seconds=10)
def write_run_outputs(results_uri: str, run_id: str, card: ModelCard, facts: dict) -> dict:
    rows = reports.read_run_rows(results_uri, run_id, card.version)
    summary = reports.summarise(rows, card, run_id=run_id, **facts)
    outputs = reports.write_outputs(results_uri, run_id, rows, card, summary)
    reports.publish_artifacts(summary, rows, card, outputs["report.html"])
    runs.close_run(results_uri, run_id)
    return {**summary, "outputs": outputs}


@task(retries=2, retry_delay_seconds=10)
def recover_abandoned_runs(results_uri: str, run_id: str) -> list[str]:
    """Writes the outputs of runs that died without writing them (their leases went stale).

    Their rows are in the ledger already, so no input is screened twice; this only makes them
    reach a predictions file and a report, under the dead run's own folder, with status
    ``abandoned``. Two runs recovering the same dead run write the same rows.
    """
    logger = get_run_logger()
    recovered = []
    for lease in runs.abandoned_runs(results_uri):
        dead = lease["run_id"]
        try:
            card = registry.load_card(lease["model_store_uri"], lease["model_version"])
        except Exception as error:  # noqa: BLE001 - one unreadable model must not stop tonight's run
            logger.error("Run %s died without writing its outputs, and its model card cannot be read (%s); "
                         "its lease %s is left for a later run", dead, error, runs.lease_uri(results_uri, dead))
            continue
        rows = reports.read_run_rows(results_uri, dead, card.version)
        facts = {key: lease.get(key) for key in ("flow_run_id", "started_at", "incoming_uri", "inputs_found",
                                                  "already_screened", "to_screen")}
        summary = reports.summarise(rows, card, run_id=dead, **facts, status="abandoned", seconds=None,
                                    last_seen_at=lease["renewed_at"], recovered_by=run_id,
                                    recovered_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        outputs = reports.write_outputs(results_uri, dead, rows, card, summary)
        runs.close_run(results_uri, dead)
        _mark_crashed(lease.get("flow_run_id"), f"Abandoned: no sign of life since {lease['renewed_at']}; "
                                                 f"its {len(rows)} screened rows were published by run {run_id}")
        logger.warning("Run %s died at about %s without writing its outputs; its %d screened rows are now in %s",
                       dead, lease["renewed_at"], len(rows), outputs["predictions.csv"])
        recovered.append(dead)
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


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


@flow(name="screen", description="Screen new chest X-rays with the production model and write reports.")
def screen(
    incoming_uri: str,
    results_uri: str,
    model_store_uri: str,
    model_version: str = "production",
    batch_size: int = 16,
    chunk_size: int = 256,
    limit: int | None = None,
) -> dict:
    """Returns the run's summary, with the locations of its outputs."""
    logger = get_run_logger()
    if batch_size < 1 or chunk_size < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size and chunk_size must be at least 1, and limit 0 or more")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    run_id = new_run_id()
    card = resolve_model(model_store_uri, model_version)
    recovered = recover_abandoned_runs(results_uri, run_id)

    inputs = find_inputs(incoming_uri, exclude=[results_uri, model_store_uri])
    done = already_screened(results_uri, card.version)
    todo = [uri for uri in inputs if ledger.entry_key(uri) not in done]
    already = len(inputs) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    logger.info("Model %s; %d images found under %s, %d already screened by this model, %d to screen now",
                card.version, len(inputs), incoming_uri, already, len(todo))

    progress = create_progress_artifact(0.0, key="screening-progress", description=f"Screening run {run_id}")
    facts = {"flow_run_id": str(flow_run.get_id() or ""), "started_at": started_at, "incoming_uri": incoming_uri,
             "inputs_found": len(inputs), "already_screened": already,
             "to_screen": len(todo), "claimed_by_other_runs": 0, "vanished": 0, "recovered_runs": recovered,
             "status": "running"}
    # From the first claim on, a lease says this run is alive. Locations are absolute: the run that
    # may one day recover this one can start in another folder.
    runs.open_run(results_uri, run_id, model_store_uri=storage.join(model_store_uri), model_version=card.version,
                  **{**facts, "incoming_uri": storage.join(incoming_uri)})
    screened = 0
    try:
        for number, uris in enumerate(chunked(todo, chunk_size)):
            result = screen_chunk(number, uris, model_store_uri, card.version, results_uri, run_id, batch_size)
            screened += len(uris)
            facts["claimed_by_other_runs"] += result.already_done
            facts["vanished"] += len(result.vanished)
            update_progress_artifact(progress, 100.0 * screened / len(todo))
            for listener in progress_listeners:
                listener(screened, len(todo))
            logger.info("Chunk %d: %d images in %.1f s (%d flagged, %d rejected, %d already done by another run)",
                        number, len(uris), result.seconds, result.flagged, result.rejected, result.already_done)
        facts["status"] = "completed"
    except BaseException:
        facts["status"] = "failed"
        raise
    finally:
        facts["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        facts["seconds"] = round(time.perf_counter() - started, 3)
        summary = write_run_outputs(results_uri, run_id, card, facts)
        logger.info("Run %s %s: %d screened, %d flagged, %d rejected. Report: %s", run_id, facts["status"],
                    summary["screened"], summary["flagged"], summary["rejected"], summary["outputs"]["report.html"])
    return summary
