"""Run leases: a live run is left alone, a silent one is found, a damaged or forged lease blocks nobody."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from tasks import runs, storage
from tasks.results import ResultsLayout, RunSummary


@pytest.fixture(params=["local", "s3"])
def results(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "results")
    return request.getfixturevalue("s3_bucket") + "/results"


def backdate(results: str, run_id: str, by: timedelta) -> None:
    uri = ResultsLayout(results).lease(run_id)
    lease = json.loads(storage.read_bytes(uri))
    lease["renewed_at"] = (datetime.now(timezone.utc) - by).isoformat()
    storage.write_bytes(uri, json.dumps(lease).encode())


def test_no_leases_yet(results):
    assert runs.abandoned_runs(results) == []


def test_only_leases_silent_for_longer_than_the_limit_are_abandoned(results):
    runs.open_run(results, RunSummary("alive", "v1"))
    runs.open_run(results, RunSummary("quiet", "v1"))
    runs.open_run(results, RunSummary("dead", "v2", incoming_uri="s3://pacs/in", to_screen=7))
    backdate(results, "quiet", runs.ABANDONED_AFTER - timedelta(minutes=5))
    backdate(results, "dead", runs.ABANDONED_AFTER + timedelta(minutes=1))

    (dead,) = runs.abandoned_runs(results)
    assert (dead.run_id, dead.model_version, dead.incoming_uri, dead.to_screen) == ("dead", "v2", "s3://pacs/in", 7)
    assert dead.last_seen_at is not None

    runs.renew(results, "quiet")  # a renewal resets the clock
    assert [lease.run_id for lease in runs.abandoned_runs(results, after=timedelta(minutes=1))] == ["dead"]

    runs.close_run(results, "dead")
    runs.close_run(results, "dead")  # recovered by two runs at once: the second close is harmless
    runs.renew(results, "dead")  # a late renewal does not reopen a closed lease
    assert runs.abandoned_runs(results) == []
    assert not storage.exists(ResultsLayout(results).lease("dead"))


def test_a_damaged_lease_is_reported_and_skipped(results, caplog):
    storage.write_bytes(ResultsLayout(results).lease("garbled"), b"{not json")
    runs.open_run(results, RunSummary("dead", "v1"))
    backdate(results, "dead", timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="tasks.runs"):
        assert [lease.run_id for lease in runs.abandoned_runs(results)] == ["dead"]
    assert "garbled.json is not a run lease" in caplog.text


def test_a_forged_lease_cannot_point_a_run_outside_its_folder(results, caplog):
    old = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    for name, run_id in (("forged", "../../elsewhere"), ("renamed", "another-run")):
        lease = {"run_id": run_id, "model_version": "v1", "renewed_at": old}
        storage.write_bytes(storage.join(ResultsLayout(results).leases, f"{name}.json"), json.dumps(lease).encode())
    with caplog.at_level(logging.ERROR, logger="tasks.runs"):
        assert runs.abandoned_runs(results) == []
    assert "forged.json is not a run lease" in caplog.text and "not a safe name" in caplog.text
    assert "renamed.json is not a run lease" in caplog.text and "does not match its name" in caplog.text
    with pytest.raises(ValueError, match="not a safe name"):
        ResultsLayout(results).run("../x")
