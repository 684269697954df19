"""Prefect tasks of the screening flow around the chunks: the model, what is new, dead runs, outputs."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import NamedTuple

from prefect import get_run_logger, task

from model.bundle import ModelCard
from screening import drift, leases, ledger, reports
from screening.results import ResultsLayout, RunSummary, entry_key, input_name
from store import evaluations, registry, storage
from store.clock import utc_now, utc_timestamp
from tasks.retrying import io_step

__all__ = ["DRIFT_EVENT", "Pending", "Recovery", "announce_drift", "new_run_id", "not_yet_screened", "recover_abandoned_runs", "resolve_model",
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
def not_yet_screened(results_uri: str, card: ModelCard, inputs: Sequence[str], deidentify: bool = False,
                     live_after_minutes: float = 30.0) -> Pending:
    """The inputs this model version has screened for no one yet. The ledger is proof, not a name:
    an input whose entry does not read back as its row, or names a run that is neither open nor
    publishes that row, is screened again, its entry moved to the quarantine and the problem named.
    Inputs are looked up by ``input_name`` (a keyed token with ``deidentify``); a run is open when
    its lease was renewed within ``live_after_minutes`` (the screen flow's abandoned_after_minutes)."""
    names = {uri: input_name(uri, deidentify) for uri in inputs}
    done = ledger.stamped_keys(results_uri, card.version)
    listed = [name for name in names.values() if entry_key(name) in done]
    proven, unproven = ledger.screened(results_uri, card.version, listed, card.classes,
                                       timedelta(minutes=live_after_minutes), stamps=done)
    logger, damaged = get_run_logger(), []

    def move(item: tuple[str, str]) -> str:
        name, problem = item
        try:
            kept = ledger.quarantine(results_uri, card.version, name)
        except OSError as error:  # it stays; claiming its input will fail and count it as another run's
            return f"{problem} (it could not be moved aside: {error})"
        return f"{problem} (moved to {kept}; screened again)"

    with ThreadPoolExecutor(max_workers=ledger.READERS) as pool:
        for line in pool.map(move, sorted(unproven.items())):
            damaged.append(line)
            if len(damaged) <= MAX_LOGGED:
                logger.error("%s", line)
    if len(damaged) > MAX_LOGGED:
        logger.error("... and %d more ledger entries that proved nothing (named in summary.json)", len(damaged) - MAX_LOGGED)
    return Pending([uri for uri in inputs if names[uri] not in proven], len(proven), damaged)


MAX_LOGGED = 100  # lines of one kind of damage in the log; summary.json counts them all


class Pending(NamedTuple):
    todo: list[str]  # in the listing's order
    already_screened: int
    damaged: list[str]  # "location: what is wrong" for each ledger entry that proved nothing


@task(**io_step(retries=3))
def write_run_outputs(results_uri: str, summary: RunSummary, card: ModelCard, drift_window: int = drift.DRIFT_WINDOW,
                      delivered: dict[str, str] | None = None) -> RunSummary:
    """Predictions, summary (with its drift tests), report and artifacts from every row the run
    claimed, each row with where its DICOM results stand (``delivered``, by input, from
    ``deliver_results``); then its lease goes."""
    damaged: list[str] = []
    rows = reports.read_run_rows(results_uri, summary.run_id, card, damaged=damaged)
    for row in rows:
        row.delivery = (delivered or {}).get(row.image_uri, "")
    summary = summary.tally(rows, card.classes, card.threshold)
    summary.note_damage(damaged)
    summary = reports.write_outputs(results_uri, rows, card, summary, drift_window)
    reports.publish_artifacts(summary, rows, card)
    leases.close_run(results_uri, summary.run_id)
    return summary


DRIFT_EVENT = "cxr.screening.drift"


@task
def deliver_results(params, run_id: str, card: ModelCard) -> tuple[dict, dict[str, str]]:
    """This run's PACS images' DICOM results built and kept, then everything pending sent to
    ``params.deliver_to`` (screening/delivery.py): the summary's tally, and where each of this run's
    images' results stand, by input. A failure is counted and logged, never raised: the rows are
    the run's result, delivered or not."""
    from screening import delivery

    logger = get_run_logger()
    tally = {"destination": params.deliver_to, "prepared": 0, "delivered": 0, "pending": 0, "dead": 0}
    prepared, statuses = delivery.Prepared(), {}
    try:
        prepared = delivery.prepare(params.results_uri, run_id, card, params.deliver_to, params.uid_root)
        tally["prepared"] = prepared.made
        outcome = delivery.deliver(params.results_uri, params.deliver_to, params.delivery_max_nights)
        tally.update(outcome.counts, dead_entries=outcome.dead)
        statuses = outcome.statuses
    except Exception as error:  # noqa: BLE001 - delivery never fails the run: its rows are its result
        logger.error("Delivery to %s stopped: %s; the rows are kept, and what is pending is sent on the next run",
                     params.deliver_to, error)
        tally["error"] = str(error)[:500]
    images = delivery.image_statuses(params.results_uri, card.version, prepared, statuses)
    logger.info("Delivery to %s: %d prepared, %d delivered now, %d pending, %d waiting for a person (dead)",
                params.deliver_to, tally["prepared"], tally["delivered"], tally["pending"], tally["dead"])
    return tally, images


def announce_drift(summary: RunSummary) -> bool:
    """Logs a drift alarm and emits the Prefect event ``cxr.screening.drift`` (its resource the run,
    related to the model version and the flow run; its payload the score and the failing tests),
    which the automation ``cxr-screen deploy`` creates turns into a notification and, where asked,
    a paused nightly deployment. Returns whether there was an alarm to announce."""
    result = summary.drift
    if not isinstance(result, dict) or result.get("alarm") is not True:
        return False
    failing = [test["name"] for test in result["tests"] if test.get("alarm")]
    reference = result.get("reference") or {}
    get_run_logger().warning("Drift alarm: run %s differs from %s (score %.1f): %s. Report: %s", summary.run_id,
                             drift.reference_words(result), result["score"], ", ".join(failing),
                             summary.outputs.get("report.html", ""))
    from prefect.events import emit_event

    related = [{"prefect.resource.id": f"cxr.model.{summary.model_version}", "prefect.resource.role": "model"}]
    if summary.flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{summary.flow_run_id}",
                        "prefect.resource.role": "flow-run"})
    emit_event(event=DRIFT_EVENT,
               resource={"prefect.resource.id": f"cxr.screening.run.{summary.run_id}",
                         "prefect.resource.name": f"screening run {summary.run_id}",
                         "cxr.results.uri": summary.results_uri},
               related=related,
               payload={"run_id": summary.run_id, "model_version": summary.model_version, "score": result["score"],
                        "failing": failing, "reference": reference.get("kind", ""),
                        "tests": [{key: test[key] for key in ("name", "statistic", "p_value", "alarm")}
                                  for test in result["tests"]],
                        "report": summary.outputs.get("report.html", "")})
    return True


@task(**io_step())
def recover_abandoned_runs(results_uri: str, run: RunSummary, after_minutes: float) -> Recovery:
    """Writes the outputs of runs that died without writing them: their leases went stale, or
    their flow runs ended (Failed, Crashed, Cancelled, Completed) with the lease still open.

    Their rows are in the ledger already, so no input is screened twice; this only makes them
    reach a predictions file and a report, under the dead run's own folder, with status
    ``abandoned``. Two runs recovering the same dead run write the same rows.

    A lease is followed only as far as ``_refusal`` allows: never into a published run, another
    model store or results location, or a Prefect flow run that is not a screening of these
    results; such a lease, and a dead run that cannot be recovered (unreadable card, damaged
    files), is reported and left for an operator.
    """
    logger = get_run_logger()
    flows = _FlowRuns(results_uri)
    recovered, damaged = [], []
    for dead in leases.abandoned_runs(results_uri, timedelta(minutes=after_minutes), finished=flows.finished,
                                    current_run_id=run.run_id, damaged=damaged):
        lease = ResultsLayout(results_uri).lease(dead.run_id)
        refusal = _refusal(results_uri, run, dead, flows)
        if refusal:
            logger.error("%s: not followed, %s; left for an operator", lease, refusal)
            damaged.append(f"{lease}: refused, {refusal}; left for an operator")
            continue
        try:
            rows = _recover(results_uri, dead, run.run_id, damaged)
        except reports.PublishedRunError:  # another run recovered it meanwhile: done, by someone
            logger.info("Run %s was recovered by another run meanwhile", dead.run_id)
            continue
        except (ValueError, OSError) as error:  # BundleError, StorageError: this run, not tonight's
            logger.error("Run %s died without writing its outputs, and they cannot be written now (%s); "
                         "its lease %s is left for a later run", dead.run_id, error, lease)
            damaged.append(f"{lease}: run {dead.run_id} cannot be recovered now ({error}); left for a later run")
            continue
        if flows.screens_here(dead.flow_run_id):
            _mark_crashed(dead.flow_run_id, f"Abandoned: no sign of life since {dead.last_seen_at}; "
                                            f"its {rows} screened rows were published by run {run.run_id}")
        logger.warning("Run %s died at about %s without writing its outputs; its %d screened rows are now in %s",
                       dead.run_id, dead.last_seen_at, rows, dead.outputs["predictions.csv"])
        recovered.append(dead.run_id)
    return Recovery(recovered, damaged)


class Recovery(NamedTuple):
    runs: list[str]  # the dead runs whose outputs this run wrote
    damaged: list[str]  # leases refused or not readable, each "location: why"


def _refusal(results_uri: str, run: RunSummary, dead: RunSummary, flows: _FlowRuns) -> str | None:
    """Why the lease of ``dead`` may not be followed by ``run``, or None. A lease is a file anyone
    with write access to the results could have written: it may only lead to writing a run that
    was never published, of this model store and these results, started by a screening flow."""
    if storage.exists(ResultsLayout(results_uri).run(dead.run_id).outputs["summary.json"]):
        # Nothing is lost by removing it: a published run is never written again. A run that died
        # between publishing and closing its lease leaves one of these too.
        leases.close_run(results_uri, dead.run_id)
        return f"run {dead.run_id} is published already (its outputs are never written again); the lease is removed"
    if not _same_place(dead.model_store_uri, run.model_store_uri):
        return f"it names model store {dead.model_store_uri!r}, not this run's {run.model_store_uri!r}"
    if dead.results_uri and not _same_place(dead.results_uri, results_uri):  # older leases name none
        return f"it names results location {dead.results_uri!r}, not {results_uri!r}"
    facts = flows.facts(dead.flow_run_id)
    if facts is not None and not facts.screens_here:
        return f"its flow run {dead.flow_run_id} is {facts.what}, not a screening of these results"
    return None


def _same_place(stored: str, ours: str) -> bool:
    try:
        return bool(stored) and storage.canonical(stored) == storage.canonical(ours)
    except ValueError:  # a scheme this code does not address: not ours
        return False


def _recover(results_uri: str, dead: RunSummary, run_id: str, damaged: list[str]) -> int:
    """Writes a dead run's outputs from its rows and closes its lease; returns its row count."""
    card = registry.load_card(dead.model_store_uri, dead.model_version)
    dead.status, dead.recovered_by, dead.recovered_at, dead.seconds = "abandoned", run_id, utc_timestamp(), None
    found: list[str] = []
    rows = reports.read_run_rows(results_uri, dead.run_id, card, damaged=found)
    summary = dead.tally(rows, card.classes, card.threshold)
    summary.note_damage(found)
    summary = reports.write_outputs(results_uri, rows, card, summary)
    damaged += found
    dead.outputs = summary.outputs
    leases.close_run(results_uri, dead.run_id)
    return len(rows)


class _FlowFacts(NamedTuple):
    final: bool  # in a final state: its process cannot still be writing
    screens_here: bool  # a run of the ``screen`` flow whose parameters name these results
    what: str  # how to name it in a message


class _FlowRuns:
    """What Prefect knows of the flow runs leases name, asked once each. None for a flow run Prefect
    cannot tell about (another server, an API that is down, an id it does not know): then the
    lease's age decides, and nothing is marked in Prefect."""

    def __init__(self, results_uri: str) -> None:
        self.results = storage.canonical(results_uri)
        self.known: dict[str, _FlowFacts | None] = {}

    def facts(self, flow_run_id: str) -> _FlowFacts | None:
        if not flow_run_id:
            return None
        if flow_run_id not in self.known:
            self.known[flow_run_id] = self._ask(flow_run_id)
        return self.known[flow_run_id]

    def finished(self, flow_run_id: str) -> bool:
        facts = self.facts(flow_run_id)
        return facts is not None and facts.final and facts.screens_here

    def screens_here(self, flow_run_id: str) -> bool:
        facts = self.facts(flow_run_id)
        return facts is not None and facts.screens_here

    def _ask(self, flow_run_id: str) -> _FlowFacts | None:
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(flow_run_id)
                name = client.read_flow(flow_run.flow_id).name
        except (ObjectNotFound, httpx.HTTPError, OSError, ValueError) as error:
            _logger.info("Prefect cannot say what flow run %s is (%r): its lease's age decides", flow_run_id, error)
            return None
        params = flow_run.parameters.get("params") if isinstance(flow_run.parameters, dict) else None
        results = params.get("results_uri") if isinstance(params, dict) else None
        if name == "screen" and isinstance(results, str) and "://" not in results and not results.startswith("/"):
            return None  # relative to a folder this process cannot know: Prefect cannot tell us which results
        here = name == "screen" and isinstance(results, str) and self._same(results)
        return _FlowFacts(flow_run.state is not None and flow_run.state.is_final(), here,
                          f"a run of flow {name!r}" if name != "screen" else "a screening of other results")

    def _same(self, results: str) -> bool:
        return _same_place(results, self.results)


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
