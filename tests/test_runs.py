"""Run leases: a live run is left alone, a silent one or one whose flow run ended is found, a damaged or
forged lease blocks nobody."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from flows.parameters import ScreenParameters
from screening import leases
from screening.results import ResultsLayout, RunSummary
from store import storage

ABANDONED_AFTER = timedelta(minutes=ScreenParameters.default("abandoned_after_minutes"))  # the screen flow's default


def backdate(results: str, run_id: str, by: timedelta) -> None:
    uri = ResultsLayout(results).lease(run_id)
    lease = json.loads(storage.read_bytes(uri))
    lease["renewed_at"] = (datetime.now(timezone.utc) - by).isoformat()
    storage.write_bytes(uri, json.dumps(lease).encode())


def test_no_leases_yet(location):
    assert leases.abandoned_runs(location, ABANDONED_AFTER) == []


def test_only_leases_silent_for_longer_than_the_limit_are_abandoned(location):
    leases.open_run(location, RunSummary("alive", "v1"))
    leases.open_run(location, RunSummary("quiet", "v1"))
    leases.open_run(location, RunSummary("dead", "v2", incoming_uri="s3://pacs/in", to_screen=7))
    backdate(location, "quiet", ABANDONED_AFTER - timedelta(minutes=5))
    backdate(location, "dead", ABANDONED_AFTER + timedelta(minutes=1))

    (dead,) = leases.abandoned_runs(location, ABANDONED_AFTER)
    assert (dead.run_id, dead.model_version, dead.incoming_uri, dead.to_screen) == ("dead", "v2", "s3://pacs/in", 7)
    assert dead.last_seen_at is not None

    leases.renew(location, "quiet")  # a renewal resets the clock
    assert [lease.run_id for lease in leases.abandoned_runs(location, after=timedelta(minutes=1))] == ["dead"]

    leases.close_run(location, "dead")
    leases.close_run(location, "dead")  # recovered by two runs at once: the second close is harmless
    leases.renew(location, "dead")  # a late renewal does not reopen a closed lease
    assert leases.abandoned_runs(location, ABANDONED_AFTER) == []
    assert not storage.exists(ResultsLayout(location).lease("dead"))


def test_a_damaged_lease_is_reported_and_skipped(location, caplog):
    storage.write_bytes(ResultsLayout(location).lease("garbled"), b"{not json")
    leases.open_run(location, RunSummary("dead", "v1"))
    backdate(location, "dead", timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="screening.leases"):
        assert [lease.run_id for lease in leases.abandoned_runs(location, ABANDONED_AFTER)] == ["dead"]
    assert "garbled.json: not a run lease" in caplog.text


def test_a_forged_lease_cannot_point_a_run_outside_its_folder(location, caplog):
    old = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    for name, run_id in (("forged", "../../elsewhere"), ("renamed", "another-run")):
        lease = {"run_id": run_id, "model_version": "v1", "renewed_at": old}
        storage.write_bytes(storage.join(ResultsLayout(location).leases, f"{name}.json"), json.dumps(lease).encode())
    with caplog.at_level(logging.ERROR, logger="screening.leases"):
        assert leases.abandoned_runs(location, ABANDONED_AFTER) == []
    assert "forged.json: not a run lease" in caplog.text and "not a safe name" in caplog.text
    assert "renamed.json: not a run lease" in caplog.text and "does not match its name" in caplog.text
    with pytest.raises(ValueError, match="not a safe name"):
        ResultsLayout(location).run("../x")


@pytest.mark.parametrize("change, message", [
    ({"renewed_at": "2026-11-27T00:00:00"}, "has no time zone"),  # naive: could not be compared with now
    ({"renewed_at": 5}, "renewed_at 5 is not an ISO 8601 time"),
    ({"renewed_at": None}, "renewed_at None"),
    ({"status": "<script>alert(1)</script>"}, "status '<script>alert(1)</script>' is not one of"),
    ({"model_version": "../../models"}, "model_version '../../models' is not a safe name"),
    ({"to_screen": "7"}, "to_screen '7' is not a count"),
    ({"recovered_runs": "r1"}, "recovered_runs 'r1' is not a list of run ids"),
    ({"flow_run_id": "../x"}, "flow_run_id '../x' is not a flow run id"),
    ({"incoming_uri": {"a": 1}}, "incoming_uri {'a': 1} is not a string"),
])
def test_a_lease_with_a_wrong_field_is_reported_and_skipped(location, caplog, change, message):
    old = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    lease = {**RunSummary("bad", "v1").to_dict(), "renewed_at": old, **change}
    storage.write_bytes(ResultsLayout(location).lease("bad"), json.dumps(lease).encode())
    storage.write_bytes(storage.join(ResultsLayout(location).leases, "list.json"), b"[1, 2]")
    leases.open_run(location, RunSummary("dead", "v1"))
    backdate(location, "dead", timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="screening.leases"):
        assert [lease.run_id for lease in leases.abandoned_runs(location, ABANDONED_AFTER)] == ["dead"]
    assert "bad.json: not a run lease" in caplog.text and message in caplog.text
    assert "list.json: not a run lease" in caplog.text


def test_a_damaged_own_lease_is_not_renewed_and_does_not_fail_the_run(location, caplog):
    storage.write_bytes(ResultsLayout(location).lease("mine"), b"\xff not json")
    with caplog.at_level(logging.ERROR, logger="screening.leases"):
        leases.renew(location, "mine")
    assert "mine.json: not a run lease" in caplog.text


def test_a_fresh_lease_whose_flow_run_ended_is_dead_at_once_but_never_the_current_runs(location):
    ended = {"r-ended": "5b0e7c1e-0000-4000-8000-000000000001", "r-running": "5b0e7c1e-0000-4000-8000-000000000002"}
    for run_id, flow_run_id in ended.items():
        leases.open_run(location, RunSummary(run_id, "v1", flow_run_id=flow_run_id))
    leases.open_run(location, RunSummary("r-current", "v1", flow_run_id=ended["r-ended"]))
    leases.open_run(location, RunSummary("r-no-flow-run", "v1"))
    asked = []

    def finished(flow_run_id: str) -> bool:
        asked.append(flow_run_id)
        return flow_run_id == ended["r-ended"]

    dead = leases.abandoned_runs(location, ABANDONED_AFTER, finished=finished, current_run_id="r-current")
    assert [summary.run_id for summary in dead] == ["r-ended"] and dead[0].last_seen_at is not None
    assert sorted(asked) == sorted(ended.values())  # no lease without a flow run id is asked about
    assert leases.abandoned_runs(location, ABANDONED_AFTER) == []  # without the question only age counts


# --- with a real Prefect API -----------------------------------------------------------------------


def _flow_runs_in(states: dict, results: str, flow_name: str = "screen") -> dict[str, str]:
    """Flow run ids, by name, of runs of flow ``flow_name`` screening ``results``, put in the given states."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name=flow_name)
    def nightly(params: dict) -> None:
        pass

    ids = {}
    with get_client(sync_client=True) as client:
        for name, state in states.items():
            flow_run = client.create_flow_run(nightly, name=name, state=Running(),
                                              parameters={"params": {"results_uri": results}})
            if state.type != Running().type:
                client.set_flow_run_state(flow_run.id, state, force=True)
            ids[name] = str(flow_run.id)
    return ids


def test_prefect_says_which_flow_runs_are_over_and_which_screen_these_results(prefect_api, tmp_path):
    from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running

    from tasks.screen_steps import _FlowRuns

    results = str(tmp_path / "results")
    ids = _flow_runs_in({"failed": Failed(), "crashed": Crashed(), "cancelled": Cancelled(),
                         "completed": Completed(), "running": Running(), "pending": Pending()}, results)
    flows = _FlowRuns(results)
    assert {name: flows.finished(flow_run_id) for name, flow_run_id in ids.items()} == {
        "failed": True, "crashed": True, "cancelled": True, "completed": True, "running": False, "pending": False}
    assert not flows.finished("5b0e7c1e-0000-4000-8000-0000000000ff")  # unknown here: the lease's age decides
    assert flows.facts("5b0e7c1e-0000-4000-8000-0000000000ff") is None
    # Over, but not a screening of these results: never taken as this store's dead run, never marked.
    (other,) = _flow_runs_in({"x": Failed()}, results, flow_name="train").values()
    (elsewhere,) = _flow_runs_in({"y": Failed()}, str(tmp_path / "other-results")).values()
    for flow_run_id in (other, elsewhere):
        assert not flows.finished(flow_run_id) and not flows.screens_here(flow_run_id)
    assert "a run of flow 'train'" in flows.facts(other).what


def test_the_lease_of_a_failed_or_crashed_flow_run_is_recovered_at_once(prefect_api, tmp_path):
    import hashlib

    from prefect import flow
    from prefect.states import Crashed, Failed, Running

    from model.bundle import ModelCard
    from store import registry
    from tasks.screen_steps import recover_abandoned_runs

    store, results = str(tmp_path / "models"), str(tmp_path / "results")
    card = ModelCard(version="v1", classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing={"version": 1, "input_size": 32, "scale_mode": "unit", "interpolation": "area"},
                     weights={"origin": "none"}, dataset={}, metrics={}, model_sha256=hashlib.sha256(b"m").hexdigest())
    registry.publish(store, "v1", {"model.keras": b"m"}, card)
    ids = _flow_runs_in({"failed": Failed(), "crashed": Crashed(), "running": Running()}, results)
    for name, flow_run_id in ids.items():  # fresh leases: age alone would leave them for 30 minutes
        leases.open_run(results, RunSummary(f"run-{name}", "v1", model_store_uri=store, flow_run_id=flow_run_id))

    @flow
    def recover(run_id: str) -> list[str]:
        return recover_abandoned_runs(results, RunSummary(run_id, "v1", model_store_uri=store), 30.0).runs

    assert sorted(recover("tonight")) == ["run-crashed", "run-failed"]
    for name in ("failed", "crashed"):
        summary = json.loads(storage.read_bytes(ResultsLayout(results).run(f"run-{name}").outputs["summary.json"]))
        assert summary["status"] == "abandoned" and summary["recovered_by"] == "tonight"
        assert not storage.exists(ResultsLayout(results).lease(f"run-{name}"))
    assert storage.exists(ResultsLayout(results).lease("run-running"))
    assert recover("tomorrow") == []


def test_a_run_waiting_on_its_chunks_keeps_its_lease_alive(location):
    """Chunks queued on a busy cluster renew nothing themselves: the flow's renewer does."""
    import time

    summary = RunSummary("20260101T000000Z-aaaaaa", "v1")
    leases.open_run(location, summary)
    lease = ResultsLayout(location).lease(summary.run_id)
    backdate(location, summary.run_id, timedelta(hours=2))
    assert leases.abandoned_runs(location, timedelta(minutes=30))  # as it would look with no renewer

    with leases.kept_alive(location, summary.run_id, every=0.2):
        time.sleep(1.0)  # the block: chunks queued or running elsewhere
    assert leases.abandoned_runs(location, timedelta(minutes=30)) == []
    renewed = datetime.fromisoformat(json.loads(storage.read_bytes(lease))["renewed_at"])
    assert datetime.now(timezone.utc) - renewed < timedelta(seconds=30)
