"""Nightly batch screening: new X-rays in, one prediction row each, reports out.

Steps: resolve the model version, publish the rows of earlier runs that died without writing
their outputs, list the incoming images, skip those this model version has already screened (the
ledger), screen the rest in chunks (in this process, or fanned out over Dask: flows/fan_out.py),
gathered as they finish, then write predictions, summary, report and Prefect
artifacts for this run, also when a chunk failed (then the run fails after), and announce a drift
alarm (screening/drift.py) as the Prefect event ``cxr.screening.drift``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner

from flows.fan_out import chunk_runner
from flows.parameters import ScreenParameters
from screening import leases
from screening.results import RunSummary
from store import registry, storage
from store.clock import utc_timestamp
from store.dicomweb import dated_since
from store.loading import InputLimits
from tasks.screen_chunks import ChunkResult, chunked, find_inputs, screen_chunk
from tasks.screen_steps import (
    announce_drift,
    deliver_results,
    new_run_id,
    not_yet_screened,
    recover_abandoned_runs,
    resolve_model,
    write_run_outputs,
)

# Process-local listeners of (screened so far, to screen), for progress bars in the command line.
progress_listeners: list[Callable[[int, int], None]] = []


@flow(name="screen", description="Screen new chest X-rays with the production model and write reports.")
def screen(params: ScreenParameters) -> RunSummary:
    """Returns the run's summary, with the locations of its outputs."""
    logger = get_run_logger()
    started = time.perf_counter()
    # Absolute locations from here on: chunks may run in processes started in other folders, and
    # the run that may one day recover this one can start in another folder too.
    params = params.model_copy(update={name: storage.join(getattr(params, name))
                                       for name in ("incoming_uri", "results_uri", "model_store_uri")})
    if params.since:  # the night's window, asked of the PACS; the summary keeps the location with it
        if not storage.capabilities(params.incoming_uri).dicom_instances:
            raise ValueError(f"since={params.since} is for a PACS location (dicomweb+http://...), not "
                             f"{params.incoming_uri}")
        params = params.model_copy(update={"incoming_uri": dated_since(params.incoming_uri, params.since,
                                                                       datetime.date.today())})
    results = params.results_uri
    card = resolve_model(params.model_store_uri, params.model_version)
    unsigned = registry.unsigned_warning(params.model_store_uri)
    if unsigned:
        logger.warning("%s", unsigned)
    run = RunSummary(new_run_id(), card.version, model_store_uri=params.model_store_uri,
                     incoming_uri=params.incoming_uri, results_uri=results, flow_run_id=str(flow_run.get_id() or ""),
                     started_at=utc_timestamp(), unsigned_warning=unsigned)
    recovery = recover_abandoned_runs(results, run, params.abandoned_after_minutes)
    run.recovered_runs = recovery.runs
    run.note_damage(recovery.damaged)

    inputs = find_inputs(params.incoming_uri, exclude=[results, params.model_store_uri], results_uri=results,
                         deidentify=params.deidentify)
    pending = not_yet_screened(results, card, inputs, params.deidentify, params.abandoned_after_minutes)
    run.note_damage(pending.damaged)
    todo = pending.todo
    run.inputs_found, run.already_screened = len(inputs), pending.already_screened
    todo = todo[: params.limit] if params.limit is not None else todo
    run.to_screen = len(todo)
    logger.info("Model %s; %d images found under %s, %d already screened by this model, %d to screen now",
                card.version, len(inputs), params.incoming_uri, run.already_screened, len(todo))

    limits = InputLimits(params.max_file_bytes, params.decode_timeout_seconds, within=run.incoming_uri,
                         frontal_chest_only=params.frontal_chest_only, deidentify=params.deidentify)
    delivered: dict[str, str] = {}
    with chunk_runner(params.workers, params.dask_address, [params.model_store_uri, results, params.incoming_uri]) \
            as runner:
        leases.open_run(results, run)  # from the first claim on, a lease says this run is alive
        try:
            with leases.kept_alive(results, run.run_id):  # also while chunks queue on a busy cluster
                failures = _screen_chunks(runner, params, card.version, todo, run, limits)
                if params.deliver_to:  # after the chunks wrote their rows; before the outputs, which count it
                    run.delivery, delivered = deliver_results(params, run.run_id, card)
            if failures:
                raise failures[0]
            run.status = "completed"
        except BaseException:
            run.status = "failed"
            raise
        finally:
            run.finished_at, run.seconds = utc_timestamp(), round(time.perf_counter() - started, 3)
            run = write_run_outputs(results, run, card, params.drift_window, delivered)
            announce_drift(run)
            logger.info("Run %s %s: %d screened, %d flagged, %d rejected. Report: %s", run.run_id, run.status,
                        run.screened, run.flagged, run.rejected, run.outputs["report.html"])
    return run


def _screen_chunks(runner: TaskRunner, params: ScreenParameters, model_version: str, todo: list[str],
                   run: RunSummary, limits: InputLimits) -> list[Exception]:
    """Submits every chunk and counts them into ``run`` as they finish, in whatever order; returns
    the failures, once every chunk has ended (so the outputs cover all that was screened)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="screening-progress", description=f"Screening run {run.run_id}")
    chunk = screen_chunk.with_options(timeout_seconds=params.chunk_timeout_minutes * 60)
    sizes = {runner.submit(chunk, parameters=dict(
        chunk=number, uris=uris, model_store_uri=params.model_store_uri, model_version=model_version,
        results_uri=params.results_uri, run_id=run.run_id, batch_size=params.batch_size, explain=params.explain,
        limits=limits, engine=params.engine)): len(uris) for number, uris in enumerate(chunked(todo, params.chunk_size))}
    screened, failures = 0, []
    for future in as_completed(list(sizes)):
        screened += sizes[future]
        try:
            _count(run, future.result(), sizes[future], logger)
        except Exception as error:  # noqa: BLE001 - the other chunks go on; the run fails after its outputs
            logger.error("A chunk failed: %s", error)
            failures.append(error)
        update_progress_artifact(progress, 100.0 * screened / len(todo))
        for listener in progress_listeners:
            listener(screened, len(todo))
    return failures


def _count(run: RunSummary, result: ChunkResult, size: int, logger) -> None:
    run.claimed_by_other_runs += result.already_done
    run.vanished += len(result.vanished)
    if result.engine and result.engine not in run.engine.split(", "):
        run.engine = ", ".join(filter(None, [run.engine, result.engine]))
        run.engine_reason = "; ".join(filter(None, [run.engine_reason, result.engine_reason]))
    logger.info("Chunk %d: %d images in %.1f s (%d flagged, %d rejected, %d already done by another run, %d the "
                "same DICOM instance as another input)", result.chunk, size, result.seconds, result.flagged,
                result.rejected, result.already_done, result.duplicates)
