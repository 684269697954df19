"""Stored state is input too (#22): files in the results location written by someone else (a
shared NFS export, an S3 prefix with a broad policy, a careless colleague) never stop the nights,
never change a published run, and never hide an image. Each case runs the real screening flow on a
folder and on a moto S3 server, and each refusal is one line in the run's summary naming the file."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from flows.parameters import ScreenParameters
from flows.screen import screen
from screening.results import ResultsLayout
from store import registry, storage
from store.phantoms import write_phantom_dataset

pytestmark = pytest.mark.slow

OLD = "2026-01-01T00:00:00+00:00"  # a renewal long past: the lease is taken for dead


def night(incoming: str, results: str, store: str):
    summary = screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=store))
    assert summary.status == "completed"
    return summary


def files(root: str) -> dict[str, str]:
    return {uri: hashlib.sha256(storage.read_bytes(uri)).hexdigest() for uri in storage.list_files(root)}


def screened_uris(results: str) -> list[str]:
    rows = []
    for uri in storage.list_files(storage.join(results, "runs"), {"predictions.jsonl"}):
        rows += [json.loads(line)["image_uri"] for line in storage.read_bytes(uri).splitlines()]
    return rows


def named_once(summary, uri: str) -> str:
    """The one line of the summary naming ``uri``."""
    lines = [line for line in summary.damaged_files if line.startswith((uri + ":", uri + ","))]
    assert len(lines) == 1, (uri, summary.damaged_files)
    assert "\n" not in lines[0]
    return lines[0]


def ledger_check(results: str) -> tuple[int, str]:
    from cli.main import app

    result = CliRunner().invoke(app, ["ledger", "check", results], terminal_width=400)
    return result.exit_code, result.output


@pytest.fixture
def incoming(tmp_path) -> str:
    root = str(tmp_path / "incoming")
    write_phantom_dataset(root, per_class=2, size=96, seed=5)
    return root


def test_numbers_beyond_json_and_deep_nesting_in_past_runs_never_stop_a_night(model_store, location, incoming):
    results = storage.join(location, "results")
    first = night(incoming, results, model_store)
    assert registry.signing_key() is None  # the session's store is unsigned: every night says so
    assert first.unsigned_warning.startswith(f"UNSIGNED MODEL STORE {model_store}")
    assert f"UNSIGNED MODEL STORE {model_store}: " in storage.read_bytes(first.outputs["report.html"]).decode()
    layout = ResultsLayout(results)
    published = first.outputs["summary.json"]
    summary = json.loads(storage.read_bytes(published))
    storage.write_bytes(published, json.dumps(summary).replace('"rejected": 0', f'"rejected": {10**400}').encode())
    tampered = files(layout.run(first.run_id).folder)
    lease = {**summary, "run_id": "20260101T000000Z-bignum", "renewed_at": OLD}
    storage.write_bytes(layout.lease("20260101T000000Z-bignum"),
                        json.dumps(lease).replace('"seconds": ', f'"seconds": {10**400}, "x": ').encode())
    storage.write_bytes(layout.lease("20260101T000000Z-nested"), b"[" * 100_000 + b"]" * 100_000)
    write_phantom_dataset(storage.join(incoming, "tonight"), per_class=1, size=96, seed=6)

    second = night(incoming, results, model_store)
    assert second.screened == 2 and second.damaged == 3
    assert "beyond +-2**53" in named_once(second, published)
    assert "beyond +-2**53" in named_once(second, layout.lease("20260101T000000Z-bignum"))
    assert "nested deeper than" in named_once(second, layout.lease("20260101T000000Z-nested"))
    assert files(layout.run(first.run_id).folder) == tampered  # read, never rewritten
    assert "3 stored files were damaged" in storage.read_bytes(second.outputs["report.html"]).decode()
    third = night(incoming, results, model_store)  # and every night after
    assert third.screened == 0 and third.already_screened == 6


def test_a_forged_lease_never_reopens_a_published_run_nor_crashes_another_flow_run(model_store, location, incoming,
                                                                                 tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    results = storage.join(location, "results")
    first = night(incoming, results, model_store)
    layout = ResultsLayout(results)
    published = files(layout.run(first.run_id).folder)
    assert len(screened_uris(results)) == 4

    @flow(name="someone-elses-flow")
    def unrelated() -> None:
        pass

    with get_client(sync_client=True) as client:
        bystander = client.create_flow_run(unrelated, state=Running())
    summary = json.loads(storage.read_bytes(first.outputs["summary.json"]))
    forged = {**summary, "status": "running", "renewed_at": OLD, "model_store_uri": str(tmp_path / "their-store"),
              "flow_run_id": str(bystander.id)}
    storage.write_bytes(layout.lease(first.run_id), json.dumps(forged).encode())
    # The same lease naming this store and no flow run: the run is published, which is enough.
    storage.write_bytes(layout.lease("20260101T000000Z-copied"), json.dumps(
        {**summary, "run_id": "20260101T000000Z-copied", "status": "running", "renewed_at": OLD,
         "flow_run_id": str(bystander.id)}).encode())

    second = night(incoming, results, model_store)
    assert files(layout.run(first.run_id).folder) == published  # byte for byte
    assert "is published already" in named_once(second, layout.lease(first.run_id))
    assert "not a screening of these results" in named_once(second, layout.lease("20260101T000000Z-copied"))
    assert not storage.exists(layout.lease(first.run_id))  # removed: a published run is never written again
    assert storage.exists(layout.lease("20260101T000000Z-copied"))  # left for an operator, not followed
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(bystander.id).state.is_running()  # never marked Crashed
    assert second.recovered_runs == [] and second.screened == 0


def test_an_empty_or_forged_ledger_entry_hides_no_image_and_ledger_check_names_each_damage(model_store, location,
                                                                                           incoming):
    results = storage.join(location, "results")
    version = registry.read_production(model_store).version
    layout = ResultsLayout(results)
    hidden = sorted(storage.list_files(incoming))[:2]
    empty, forged = (layout.ledger_entry(version, uri) for uri in hidden)
    storage.write_bytes(empty, b"")
    row = {"image_uri": hidden[1], "sha256": None, "status": "ok", "reason": "", "model_version": version,
           "predicted_class": "normal", "flagged": False, "screened_at": OLD, "run_id": "20260101T000000Z-nobody"}
    storage.write_bytes(forged, json.dumps(row).encode())
    code, output = ledger_check(results)
    assert code == 1 and f"damaged: {empty}" in output and f"orphan: {forged}" in output
    # A lease file's name is no proof that its run is open: garbage, and a lease renewed in the future.
    more = sorted(storage.list_files(incoming))[2:4]
    for name, uri in zip(("20260101T000000Z-garbge", "20260101T000000Z-future"), more, strict=True):
        storage.write_bytes(layout.ledger_entry(version, uri), json.dumps({**row, "image_uri": uri,
                                                                            "run_id": name}).encode())
    storage.write_bytes(layout.lease("20260101T000000Z-garbge"), b"\x00 not a lease")
    storage.write_bytes(layout.lease("20260101T000000Z-future"), json.dumps(
        {"run_id": "20260101T000000Z-future", "model_version": version, "renewed_at": "2999-01-01T00:00:00+00:00"}).encode())

    first = night(incoming, results, model_store)
    assert sorted(screened_uris(results)) == sorted(storage.list_files(incoming))  # the hidden four included
    assert "not valid JSON" in named_once(first, empty)
    assert "neither open nor published" in named_once(first, forged)
    assert "in the future" in named_once(first, layout.lease("20260101T000000Z-future"))
    quarantined = list(storage.list_files(storage.join(results, "ledger-quarantine")))
    assert len(quarantined) == 4  # kept for a person, not lost
    for name in ("20260101T000000Z-garbge", "20260101T000000Z-future"):
        storage.delete(layout.lease(name))  # an operator's clean-up: ledger check counts leases as open runs
    code, output = ledger_check(results)
    assert code == 0 and "4 ledger entries, 4 published rows: clean" in output, output

    # An entry deleted behind a published row, and a published row's entry pointing at another run.
    rows = [json.loads(line) for line in storage.read_bytes(first.outputs["predictions.jsonl"]).splitlines()]
    storage.delete(layout.ledger_entry(version, rows[0]["image_uri"]))
    storage.write_bytes(layout.ledger_entry(version, rows[1]["image_uri"]),
                        json.dumps({**rows[1], "run_id": "20260101T000000Z-other"}).encode())
    code, output = ledger_check(results)
    assert code == 1
    assert f"{rows[0]['image_uri']!r} has no ledger entry" in output
    assert f"orphan: {layout.ledger_entry(version, rows[1]['image_uri'])}" in output
    assert "is claimed by run 20260101T000000Z-other" in output
