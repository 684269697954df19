"""The ledger as proof (#22): an entry counts only when it reads back as its row and names an open
run or a published run holding that row; what a night proved by a published row is remembered with
the entry's listing stamp, so later nights read only new or changed entries, and a changed entry
(its stamp changed) or a forged memory shard is read again. On a folder and a moto S3 server."""

from __future__ import annotations

import json

import pytest

from screening import leases, ledger
from screening.results import PredictionRow, ResultsLayout, RunSummary, entry_key
from store import storage

CLASSES = ["normal", "covid"]


def claimed(results: str, run_id: str, names: list[str], publish: bool) -> None:
    rows = [PredictionRow(name, None, "ok", "", "v1", "normal", {"normal": 0.8, "covid": 0.2}, False,
                          "2026-12-01T01:00:00+00:00", run_id) for name in names]
    for row in rows:
        assert ledger.claim(results, row)
    if publish:
        outputs = ResultsLayout(results).run(run_id).outputs
        storage.write_bytes(outputs["predictions.jsonl"], b"".join(json.dumps(row.to_record()).encode() + b"\n"
                                                                   for row in rows))
        storage.write_bytes(outputs["summary.json"], json.dumps({"run_id": run_id, "model_version": "v1"}).encode())


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The inputs whose ledger entry was read (the real read_entry, counted)."""
    done: list[str] = []
    real = ledger.read_entry

    def counted(results_uri, model_version, image_uri, classes):
        done.append(image_uri)
        return real(results_uri, model_version, image_uri, classes)

    monkeypatch.setattr(ledger, "read_entry", counted)
    return done


def night(results: str, inputs: list[str]):
    stamps = ledger.stamped_keys(results, "v1")
    return ledger.screened(results, "v1", [uri for uri in inputs if entry_key(uri) in stamps], CLASSES, stamps=stamps)


def test_proofs_are_remembered_by_stamp_and_a_changed_entry_or_a_forged_shard_is_read_again(location, reads):
    results = storage.join(location, "results")
    published, live = ["/in/a.png", "/in/b.png", "/in/c.png"], ["/in/d.png"]
    claimed(results, "20261201T010000Z-pubshd", published, publish=True)
    claimed(results, "20261201T020000Z-living", live, publish=False)
    leases.open_run(results, RunSummary("20261201T020000Z-living", "v1"))

    assert night(results, published + live) == (set(published + live), {})
    assert sorted(reads) == sorted(published + live)
    reads.clear()
    assert night(results, published + live) == (set(published + live), {})
    assert reads == live  # a proof by an open run is not kept: that run may yet die unpublished

    entry = ResultsLayout(results).ledger_entry("v1", published[0])
    storage.write_bytes(entry, b"")  # its stamp changes with its bytes
    reads.clear()
    proven, unproven = night(results, published + live)
    assert proven == set(published[1:] + live) and "not valid JSON" in unproven[published[0]]
    assert sorted(reads) == sorted([published[0], *live])

    for shard in storage.list_files(ResultsLayout(results).proofs("v1")):
        storage.write_bytes(shard, json.dumps({"format": 1, "proven": 7}).encode())  # forged: ignored
    reads.clear()
    assert night(results, published[1:] + live)[0] == set(published[1:] + live)
    assert sorted(reads) == sorted(published[1:] + live)  # all read again, and remembered again
