"""The screening flow end to end: every input exactly once, across reruns, failures and
concurrent runs, on a folder and on a moto S3 server."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.parameters import ScreenParameters
from flows.screen import screen
from model.bundle import BundleError
from model.inference import EngineCheck, make_predictor
from screening import ledger
from store import engines, registry, storage
from store.phantoms import chest_phantom, write_phantom_dataset
from tasks import screen_chunks
from tasks.screen_chunks import find_inputs
from tests.conftest import copy_tree, flow_run_artifacts
from tests.dicom_builder import dicom_bytes, radiograph

pytestmark = pytest.mark.slow


def run_screen(incoming: str, results: str, store: str, return_state: bool = False, **options):
    return screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=store, **options),
                  return_state=return_state)


def dicom_without_suffix() -> bytes:
    pixels = chest_phantom(np.random.default_rng(3), 128).astype(np.uint16) * 16
    return dicom_bytes(radiograph(pixels, bits_stored=12, Modality=None, PatientName=None))


def make_incoming(root: str, seed: int = 0, per_class: int = 6) -> dict[str, str]:
    """Phantoms, a DICOM with no suffix, broken files and a non-image; returns image URI -> expected status."""
    expected = {uri: "ok" for uri in write_phantom_dataset(root, per_class=per_class, size=128, seed=seed)}
    extras = {
        f"scanner/IM{seed:04d}": (dicom_without_suffix(), "ok"),
        f"broken/empty-{seed}.png": (b"", "rejected"),
        f"broken/text-{seed}.jpg": (b"radiology report\n" * 20, "rejected"),
        f"broken/truncated-{seed}.png": (cv2.imencode(".png", chest_phantom(np.random.default_rng(1), 128))[1].tobytes()[:400], "rejected"),
    }
    for name, (data, status) in extras.items():
        uri = storage.join(root, name)
        storage.write_bytes(uri, data)
        expected[uri] = status
    storage.write_bytes(storage.join(root, "notes.txt"), b"not an image")  # never listed
    return expected


def run_rows(results: str) -> list[dict]:
    """All rows of all runs' predictions.csv under ``results``."""
    rows = []
    for uri in storage.list_files(storage.join(results, "runs"), {"predictions.csv"}):
        rows.extend(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))
    return rows


def snapshot(root: str) -> dict[str, str]:
    return {uri: hashlib.sha256(storage.read_bytes(uri)).hexdigest() for uri in storage.list_files(root)}


def test_screen_a_folder_rerun_and_new_arrivals(model_store, tmp_path):
    incoming, results = str(tmp_path / "incoming"), str(tmp_path / "results")
    expected = make_incoming(incoming)
    before = snapshot(incoming)

    state = run_screen(incoming, results, model_store, chunk_size=5, batch_size=4, return_state=True)
    summary = state.result()
    assert summary.status == "completed" and summary.screened == len(expected)
    rows = run_rows(results)
    assert {row["image_uri"]: row["status"] for row in rows} == expected
    assert len(rows) == len(expected)

    card = registry.load_card(model_store)
    header = list(rows[0].keys())
    assert header == ["image_uri", "sha256", "status", "reason", "model_version", "predicted_class",
                      "prob_non-covid", "prob_covid", "flagged", "screened_at", "run_id", "engine", "cam_lung_share",
                      "scope_score", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                      "accession_number", "view_position", "modality", "manufacturer", "photometric_interpretation",
                      "pixel_spacing", "image_brightness", "image_contrast", "same_as", "delivery"]
    allowed, _ = engines.validated_engines(model_store, card)
    assert summary.engine in allowed and summary.engine_reason.startswith("auto:")
    for row in rows:
        assert row["model_version"] == card.version and row["run_id"] == summary.run_id
        assert row["sha256"] == before[row["image_uri"]]
        assert row["engine"] == (summary.engine if row["status"] == "ok" else "")
        if row["status"] == "ok":
            probabilities = [float(row["prob_non-covid"]), float(row["prob_covid"])]
            assert abs(sum(probabilities) - 1) < 1e-4
            assert row["flagged"] == str(probabilities[1] >= card.threshold)
            # Binary: the threshold decides the predicted class too, so it always agrees with the flag.
            assert row["predicted_class"] == ("covid" if row["flagged"] == "True" else "non-covid")
            if row["flagged"] != "True":  # only flagged images are explained (a map with no mass has no share)
                assert row["cam_lung_share"] == ""
        else:
            assert row["reason"] and row["flagged"] == "False" and row["prob_covid"] == ""
    reasons = {Path(r["image_uri"]).name: r["reason"] for r in rows if r["status"] == "rejected"}
    assert reasons["empty-0.png"] == "empty file" and "not an image" in reasons["text-0.jpg"]
    assert "truncated" in reasons["truncated-0.png"] or "corrupt" in reasons["truncated-0.png"]

    outputs = summary.outputs
    jsonl = [json.loads(line) for line in storage.read_bytes(outputs["predictions.jsonl"]).decode().splitlines()]
    assert [r["image_uri"] for r in jsonl] == [r["image_uri"] for r in rows]
    stored_summary = json.loads(storage.read_bytes(outputs["summary.json"]))
    assert stored_summary["flagged"] == sum(r["flagged"] == "True" for r in rows)
    assert stored_summary["rejected"] == 3 and stored_summary["model_version"] == card.version
    report = storage.read_bytes(outputs["report.html"]).decode()
    assert "not a diagnosis" in report and card.version in report and "empty file" in report
    assert "<script" not in report and "http://" not in report and "https://" not in report
    if stored_summary["flagged"]:
        assert report.count('alt="Grad-CAM"') == stored_summary["flagged"]  # every flagged image explained
    # Part files keep each explained image's map at its own resolution (the session model's 32 px input:
    # 2x2), a few hundred bytes; the coloured overlay is made for the report's rows only.
    parts = [json.loads(line) for uri in storage.list_files(storage.join(results, "runs", summary.run_id, "parts"))
             for line in storage.read_bytes(uri).decode().splitlines()]
    explained = [part for part in parts if part.get("cam")]
    assert len(explained) == stored_summary["flagged"] and not any("explanation" in part for part in parts)
    maps = [cv2.imdecode(np.frombuffer(base64.b64decode(part["cam"]), np.uint8), cv2.IMREAD_GRAYSCALE) for part in explained]
    assert all(cam.shape == (2, 2) and cam.max() in (0, 255) for cam in maps), [cam.shape for cam in maps]
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"screening-summary", "screening-flagged", "screening-progress"} <= artifacts.keys()
    assert artifacts["screening-progress"].data == pytest.approx(100.0)

    assert snapshot(incoming) == before  # nothing modified, moved or deleted

    again = run_screen(incoming, results, model_store)
    assert again.screened == 0 and again.already_screened == len(expected)

    new = make_incoming(storage.join(incoming, "tuesday"), seed=1, per_class=2)
    third = run_screen(incoming, results, model_store)
    assert third.screened == len(new)
    assert {r["image_uri"] for r in run_rows(results) if r["run_id"] == third.run_id} == set(new)
    assert len(run_rows(results)) == len(expected) + len(new)
    assert len(ledger.done_keys(results, card.version)) == len(expected) + len(new)


def test_a_failed_run_then_a_rerun_gives_every_input_exactly_once(model_store, tmp_path, monkeypatch):
    incoming, results = str(tmp_path / "incoming"), str(tmp_path / "results")
    expected = make_incoming(incoming, per_class=8)
    from flows import screen as screen_module

    real_claim, calls = ledger.claim, {"n": 0}

    def failing_claim(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:  # the storage goes away in the middle of the second chunk
            raise storage.StorageError(args[0], "connection reset")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(ledger, "claim", failing_claim)
    monkeypatch.setattr(screen_module.screen_chunk, "retries", 0)
    state = run_screen(incoming, results, model_store, chunk_size=5, return_state=True)
    assert state.is_failed()
    failed_rows = run_rows(results)
    assert len(failed_rows) == 7  # claimed before the failure, and in the failed run's outputs
    (summary_uri,) = storage.list_files(storage.join(results, "runs"), {"summary.json"})
    assert json.loads(storage.read_bytes(summary_uri))["status"] == "failed"

    monkeypatch.setattr(ledger, "claim", real_claim)
    rerun = run_screen(incoming, results, model_store, chunk_size=5)
    assert rerun.status == "completed" and rerun.screened == len(expected) - 7
    uris = [row["image_uri"] for row in run_rows(results)]
    assert sorted(uris) == sorted(expected)  # every input, exactly once


def test_two_runs_started_together_write_no_duplicates(model_store, tmp_path):
    incoming, results = str(tmp_path / "incoming"), str(tmp_path / "results")
    expected = make_incoming(incoming, per_class=15)
    from prefect.settings import PREFECT_API_URL

    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "cli.main", "screen", incoming, "--results", results,
               "--model-store", model_store, "--chunk-size", "4", "--batch-size", "4"]
    processes = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0].decode() for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    rows = run_rows(results)
    assert sorted(row["image_uri"] for row in rows) == sorted(expected)
    assert all("report.html" in output for output in outputs)


def test_a_killed_run_is_published_by_a_later_run_once_its_lease_is_stale(model_store, tmp_path):
    """SIGKILL between claiming rows and writing them: nothing reaches a report until a later run,
    finding the dead run's lease stale, writes its outputs from the ledger. Every input once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    incoming, results = str(tmp_path / "incoming"), str(tmp_path / "results")
    expected = make_incoming(incoming, per_class=50)  # claims are per image: the kill lands in the first chunk
    version = registry.production_version(model_store)
    claimed_folder = tmp_path / "results" / "ledger" / version
    command = [sys.executable, "-m", "cli.main", "screen", incoming, "--results", results,
               "--model-store", model_store, "--chunk-size", "40", "--batch-size", "4"]
    process = subprocess.Popen(command, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (claimed_folder.is_dir() and any(claimed_folder.glob("*.json"))):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it claimed anything"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    claimed_by_dead = len(ledger.done_keys(results, version))
    (lease_file,) = storage.list_files(storage.join(results, "open-runs"))
    dead = json.loads(storage.read_bytes(lease_file))
    assert 0 < claimed_by_dead < len(expected), "the kill must land mid-way for this test to mean anything"
    assert run_rows(results) == []  # the dead run wrote no outputs

    # Soon after: the dead run might still be alive, so it is left alone.
    first = run_screen(incoming, results, model_store, chunk_size=100)
    assert first.recovered_runs == [] and first.screened == len(expected) - claimed_by_dead
    assert len(run_rows(results)) == len(expected) - claimed_by_dead

    # Later: its lease is stale, and its rows are published under its own run folder.
    abandoned_after = timedelta(minutes=ScreenParameters.default("abandoned_after_minutes"))
    dead["renewed_at"] = (datetime.now(UTC) - abandoned_after - timedelta(minutes=1)).isoformat()
    storage.write_bytes(lease_file, json.dumps(dead).encode())
    later = run_screen(incoming, results, model_store)
    assert later.recovered_runs == [dead["run_id"]] and later.screened == 0
    rows = run_rows(results)
    assert sorted(row["image_uri"] for row in rows) == sorted(expected)  # every input, exactly once
    assert sum(row["run_id"] == dead["run_id"] for row in rows) == claimed_by_dead
    dead_folder = storage.join(results, "runs", dead["run_id"])
    dead_summary = json.loads(storage.read_bytes(storage.join(dead_folder, "summary.json")))
    assert dead_summary["status"] == "abandoned" and dead_summary["recovered_by"] == later.run_id
    assert dead_summary["screened"] == claimed_by_dead
    assert "stopped without finishing" in storage.read_bytes(storage.join(dead_folder, "report.html")).decode()
    assert not storage.exists(lease_file)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(dead["flow_run_id"]).state.is_crashed()
    assert run_screen(incoming, results, model_store).recovered_runs == []  # published once


def test_screen_on_s3(model_store, s3_bucket):
    store, incoming, results = f"{s3_bucket}/models", f"{s3_bucket}/incoming", f"{s3_bucket}/results"
    copy_tree(model_store, store)
    expected = make_incoming(incoming)
    summary = run_screen(incoming, results, store, chunk_size=6)
    assert summary.status == "completed"
    assert summary.outputs["report.html"].startswith(f"{results}/runs/")
    assert {row["image_uri"]: row["status"] for row in run_rows(results)} == expected
    assert run_screen(incoming, results, store).screened == 0


def test_inputs_are_found_among_1500_keys_on_s3(s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    from store.storage import _client

    bucket = s3_bucket[len("s3://"):]
    names = [f"incoming/day-{i % 7}/img {i:05d}.png" for i in range(1500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: _client().put_object(Bucket=bucket, Key=name, Body=b"x"), names))
    storage.write_bytes(f"{s3_bucket}/incoming/pacs/1.2.840.10008.42", bytes(128) + b"DICM" + bytes(10))
    storage.write_bytes(f"{s3_bucket}/incoming/pacs/readme", b"no preamble here")
    storage.write_bytes(f"{s3_bucket}/incoming/results/old.png", b"x")
    storage.write_bytes(f"{s3_bucket}/incoming/models/v1/roc.png", b"x")
    found = find_inputs.fn(f"{s3_bucket}/incoming", exclude=[f"{s3_bucket}/incoming/results", f"{s3_bucket}/incoming/models"])
    assert len(found) == 1501
    assert f"{s3_bucket}/incoming/pacs/1.2.840.10008.42" in found


def test_results_and_models_inside_the_incoming_folder_are_not_screened(model_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = make_incoming("incoming", per_class=1)
    copy_tree(model_store, "incoming/models")
    summary = run_screen("./incoming", "incoming/results", str(tmp_path / "incoming" / "models"))
    assert summary.screened == len(expected)
    assert run_screen("incoming", "./incoming/results", "incoming/models").screened == 0


def test_a_model_this_code_cannot_reproduce_is_refused(model_store, tmp_path):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    version = registry.production_version(store)
    card_uri = storage.join(store, version, "card.json")
    card = json.loads(storage.read_bytes(card_uri))
    card["preprocessing"]["scale_mode"] = "histogram-equalised"
    storage.write_bytes(card_uri, json.dumps(card).encode())
    incoming = str(tmp_path / "incoming")
    make_incoming(incoming, per_class=1)
    with pytest.raises(BundleError, match="not supported by this code"):
        run_screen(incoming, str(tmp_path / "results"), store)
    assert not storage.exists(str(tmp_path / "results" / "ledger"))


def test_a_deterministic_error_fails_at_once_without_retries(model_store, tmp_path):
    """A missing folder fails the same way every time: no retry, no retry wait, one clear error."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(catcher)
    started = time.monotonic()
    try:
        state = run_screen(str(tmp_path / "no-such-folder"), str(tmp_path / "results"), model_store, return_state=True)
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    assert state.is_failed() and time.monotonic() - started < 10  # find_inputs' retry delay is 10 s
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert errors and all("no-such-folder" in record.getMessage() for record in errors)
    assert not any(record.exc_info for record in errors), "a traceback buries the one line that says what is wrong"
    with pytest.raises(storage.NotFound, match="no-such-folder"):
        state.result()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    (find,) = [run for run in task_runs if run.name.startswith("find_inputs")]
    assert find.run_count == 1 and find.state.is_failed()


def test_an_engine_that_failed_its_gate_is_refused_and_auto_says_why(model_store, tmp_path):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    recorded = json.loads(storage.read_bytes(storage.join(store, card.version, engines.ENGINES_FILE)))
    assert set(recorded["checks"]) == {"bf16", "int8"}  # training checked them on the test split
    failed = EngineCheck("bf16", 10, 0.9, 0.2, 0.05, False)
    engines.record_checks(store, card, [failed])
    incoming = str(tmp_path / "incoming")
    write_phantom_dataset(incoming, per_class=2, size=96, seed=5)

    state = run_screen(incoming, str(tmp_path / "results"), store, engine="bf16", return_state=True)
    assert state.is_failed()
    with pytest.raises(BundleError, match="engine bf16 may not serve model .*bf16 failed the gate"):
        state.result()
    summary = run_screen(incoming, str(tmp_path / "results-auto"), store)
    assert summary.engine == "fp32" and "bf16 failed the gate" in summary.engine_reason
    assert {row["engine"] for row in run_rows(str(tmp_path / "results-auto"))} == {"fp32"}


def test_auto_leaves_out_an_engine_whose_files_were_replaced(model_store, tmp_path):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    storage.write_bytes(storage.join(store, card.version, "model-int8.bin"), b"\x00" * 64)
    allowed, _ = engines.validated_engines(store, card)
    incoming = str(tmp_path / "incoming")
    write_phantom_dataset(incoming, per_class=2, size=96, seed=6)

    summary = run_screen(incoming, str(tmp_path / "results"), store)

    assert summary.status == "completed" and summary.engine in set(allowed) - {"int8"}
    if "int8" in allowed:
        assert "int8 could not be loaded" in summary.engine_reason and "does not match its sha256" in summary.engine_reason


def test_large_jpegs_are_decoded_at_reduced_resolution_once_that_passed_the_gate(model_store, tmp_path):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for index in range(4):  # 128 px JPEGs for a 32 px model: libjpeg may decode them at 1/4
        image = chest_phantom(np.random.default_rng(index), 128)
        cv2.imwrite(str(incoming / f"{index}.jpg"), image)
    before = run_screen(str(incoming), str(tmp_path / "results-full"), store, engine="fp32")
    assert "reduced resolution" not in before.engine_reason  # the phantoms are PNGs: never checked
    engines.record_checks(store, card, [EngineCheck("reduced-jpeg", 10, 1.0, 0.001, 0.0, True)])
    screen_chunks._model.cache_clear()  # a process loads a version once; a flow run is a new process

    after = run_screen(str(incoming), str(tmp_path / "results-reduced"), store, engine="fp32")

    assert "large JPEGs decoded at reduced resolution" in after.engine_reason and after.ok == 4
    full = {row["image_uri"]: float(row["prob_covid"]) for row in run_rows(str(tmp_path / "results-full"))}
    reduced = {row["image_uri"]: float(row["prob_covid"]) for row in run_rows(str(tmp_path / "results-reduced"))}
    assert full.keys() == reduced.keys() and full != reduced  # the shortcut really changed the pixels
    assert max(abs(full[uri] - reduced[uri]) for uri in full) < 0.05


def test_explanations_come_from_the_engine_only_once_they_passed_their_gate(model_store, tmp_path, monkeypatch):
    """bf16 may serve, but until its explanations pass their own gate the explained images take a
    float32 pass: the summary says which, and the maps agree either way. With explanations asked
    for, auto leaves such an engine out."""
    engines_made = []

    def recording(model, spec, engine="fp32", artifacts=None):  # the real predictor, counted
        engines_made.append(engine)
        return make_predictor(model, spec, engine, artifacts)

    monkeypatch.setattr(screen_chunks, "make_predictor", recording)
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    unchecked = EngineCheck("bf16", 10, 1.0, 0.001, 0.0, True)  # serves (rule 1), its maps never checked
    engines.record_checks(store, card, [unchecked])
    incoming = str(tmp_path / "incoming")
    write_phantom_dataset(incoming, per_class=3, size=96, seed=7)
    screen_chunks._model.cache_clear()

    slow = run_screen(incoming, str(tmp_path / "results-float32"), store, engine="bf16", explain="all")
    assert "explanations by a float32 Grad-CAM pass of their own" in slow.engine_reason
    assert engines_made[0] == "bf16" and engines_made.count("fp32") >= 1  # a float32 pass per batch explained
    auto = run_screen(incoming, str(tmp_path / "results-auto"), store, explain="all")
    assert auto.engine == "fp32" and "left out while explaining: bf16" in auto.engine_reason
    checked = dataclasses.replace(unchecked, explanation_correlation=0.999, explanation_lung_share_difference=0.01)
    engines.record_checks(store, card, [checked])
    screen_chunks._model.cache_clear()
    engines_made.clear()
    fast = run_screen(incoming, str(tmp_path / "results-forward"), store, engine="bf16", explain="all")
    assert "explanations from bf16's forward pass" in fast.engine_reason
    assert engines_made == ["bf16"]  # no float32 pass

    shares = [{row["image_uri"]: float(row["cam_lung_share"]) for row in run_rows(str(tmp_path / name))
               if row["cam_lung_share"]} for name in ("results-float32", "results-forward")]
    assert shares[0].keys() == shares[1].keys() and len(shares[0]) >= 5
    assert max(abs(shares[0][uri] - shares[1][uri]) for uri in shares[0]) < 0.05
