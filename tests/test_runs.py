"""Run leases: a live run is left alone, a silent one is found, a damaged lease blocks nobody."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from tasks import runs, storage


@pytest.fixture(params=["local", "s3"])
def results(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "results")
    return request.getfixturevalue("s3_bucket") + "/results"


def backdate(results: str, run_id: str, by: timedelta) -> None:
    uri = runs.lease_uri(results, run_id)
    lease = json.loads(storage.read_bytes(uri))
    lease["renewed_at"] = (datetime.now(timezone.utc) - by).isoformat()
    storage.write_bytes(uri, json.dumps(lease).encode())


def test_no_leases_yet(results):
    assert runs.abandoned_runs(results) == []


def test_only_leases_silent_for_longer_than_the_limit_are_abandoned(results):
    runs.open_run(results, "alive", model_version="v1")
    runs.open_run(results, "quiet", model_version="v1")
    runs.open_run(results, "dead", model_version="v2", incoming_uri="s3://pacs/in")
    backdate(results, "quiet", runs.ABANDONED_AFTER - timedelta(minutes=5))
    backdate(results, "dead", runs.ABANDONED_AFTER + timedelta(minutes=1))

    (dead,) = runs.abandoned_runs(results)
    assert dead["run_id"] == "dead" and dead["model_version"] == "v2" and dead["incoming_uri"] == "s3://pacs/in"

    runs.renew(results, "quiet")  # a renewal resets the clock
    assert [lease["run_id"] for lease in runs.abandoned_runs(results, after=timedelta(minutes=1))] == ["dead"]

    runs.close_run(results, "dead")
    runs.close_run(results, "dead")  # recovered by two runs at once: the second close is harmless
    runs.renew(results, "dead")  # a late renewal does not reopen a closed lease
    assert runs.abandoned_runs(results) == []
    assert not storage.exists(runs.lease_uri(results, "dead"))


def test_a_damaged_lease_is_reported_and_skipped(results, caplog):
    storage.write_bytes(runs.lease_uri(results, "garbled"), b"{not json")
    runs.open_run(results, "dead")
    backdate(results, "dead", timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="tasks.runs"):
        assert [lease["run_id"] for lease in runs.abandoned_runs(results)] == ["dead"]
    assert "garbled.json is not a run lease" in caplog.text
