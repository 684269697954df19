"""The same DICOM instance (SOP Instance UID and pixels) under two locations is screened once per
model version (screening/ledger.py ``InstanceClaims``): the second location gets a "duplicate" row
naming the first. A UID reused with other pixels is screened on its own, and a claim that proves
nothing (forged, naming a live run that does not list it, or left by a run that died before its row)
never stops an image from being screened."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from screening import leases, ledger
from screening.results import ResultsLayout, RunSummary
from store import registry, storage
from store.loading import RETRIED_NEXT_RUN, load_image
from store.phantoms import chest_phantom
from tests.dicom_builder import dicom_bytes, radiograph
from tests.test_screen_flow import run_rows, run_screen

pytestmark = pytest.mark.slow


def chest_dicom(seed: int, **header) -> tuple[bytes, str]:
    pixels = chest_phantom(np.random.default_rng(seed), 128).astype(np.uint16) * 16
    dataset = radiograph(pixels, bits_stored=12, ViewPosition="PA", BodyPartExamined="CHEST", **header)
    return dicom_bytes(dataset), str(dataset.SOPInstanceUID)


def fingerprint(path: Path, model_store: str) -> str:
    """What a claim keeps of the decoded image (tasks/screen_chunks.py): its model-ready pixels' sha256."""
    loaded = load_image(str(path), registry.load_card(model_store).spec())
    return hashlib.sha256(np.ascontiguousarray(loaded.pixels).tobytes()).hexdigest()


def test_the_same_instance_from_a_second_location_is_not_screened_again(model_store, tmp_path):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    (incoming / "export").mkdir(parents=True)
    first, uid = chest_dicom(1)
    other, other_uid = chest_dicom(2)
    for name, data in (("IM0001.dcm", first), ("IM0002.dcm", other), ("IM0001-again.dcm", first)):
        (incoming / "export" / name).write_bytes(data)
    night = run_screen(str(incoming), results, model_store)
    assert night.screened == 2 and night.duplicates == 1 and night.ok == 2
    rows = {Path(row["image_uri"]).name: row for row in run_rows(results)}
    pair = [rows["IM0001.dcm"], rows["IM0001-again.dcm"]]
    (screened,) = [row for row in pair if row["status"] == "ok"]
    (copy,) = [row for row in pair if row["status"] == "duplicate"]
    assert copy["same_as"] == screened["image_uri"] and copy["sop_instance_uid"] == uid == screened["sop_instance_uid"]
    assert copy["prob_covid"] == "" and copy["flagged"] == "False" and night.run_id in copy["reason"]
    # Its first row was not published yet when it was found: not final, looked at again next run.
    assert copy["reason"].endswith(RETRIED_NEXT_RUN)
    assert {row["sop_instance_uid"] for row in rows.values() if row["status"] == "ok"} == {uid, other_uid}

    # The next night: that copy is a final duplicate now, and the instance arriving under a third
    # name (a re-sent study) is one too.
    (incoming / "resent").mkdir()
    (incoming / "resent" / "copy.dcm").write_bytes(first)
    again = run_screen(str(incoming), results, model_store)
    assert again.screened == 0 and again.duplicates == 2 and again.flagged == 0 and again.to_screen == 2
    latest = [row for row in run_rows(results) if row["run_id"] == again.run_id]
    assert {Path(row["image_uri"]).name for row in latest} == {Path(copy["image_uri"]).name, "copy.dcm"}
    assert all(row["same_as"] == screened["image_uri"] and not row["reason"].endswith(RETRIED_NEXT_RUN)
               for row in latest)

    # Each location has its final row: nothing is read the night after, and the audit finds nothing.
    third = run_screen(str(incoming), results, model_store)
    assert third.to_screen == 0
    assert ledger.reconcile(results).clean


def test_a_reused_uid_with_other_pixels_is_screened_on_its_own(model_store, tmp_path, caplog):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    incoming.mkdir()
    original, uid = chest_dicom(6)
    (incoming / "a.dcm").write_bytes(original)
    run_screen(str(incoming), results, model_store)
    reused, _ = chest_dicom(7, SOPInstanceUID=uid)  # another image under the same UID (a faulty anonymiser)
    (incoming / "b.dcm").write_bytes(reused)
    with caplog.at_level("WARNING"):
        summary = run_screen(str(incoming), results, model_store)
    assert summary.screened == 1 and summary.duplicates == 0
    (row,) = [row for row in run_rows(results) if row["run_id"] == summary.run_id]
    assert row["status"] == "ok" and row["sop_instance_uid"] == uid and row["prob_covid"] != ""
    assert "and other pixels: screened on its own" in caplog.text


def test_a_claim_that_proves_nothing_is_set_aside_and_the_image_screened(model_store, tmp_path, caplog):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    incoming.mkdir()
    seed, _ = chest_dicom(3)
    (incoming / "seed.dcm").write_bytes(seed)
    version = run_screen(str(incoming), results, model_store).model_version
    layout = ResultsLayout(results)
    live = RunSummary("20261201T000000Z-live00", version)  # a run that is open, and never listed these
    leases.open_run(results, live)
    planted = {}
    for seed_number, name in ((4, "another-instance"), (5, "dead-run"), (8, "live-run"), (9, "not-ours")):
        data, uid = chest_dicom(seed_number)
        (incoming / f"{name}.dcm").write_bytes(data)
        planted[name] = uid
    pixels = {name: fingerprint(incoming / f"{name}.dcm", model_store) for name in planted}
    claims = {  # each with the right pixels, so that only the proof can refuse it
        "another-instance": {"image_uri": str(incoming / "seed.dcm"), "run_id": "somebody"},
        "dead-run": {"image_uri": "/gone/IM9.dcm", "run_id": "20261201T000000Z-dead00"},
        "live-run": {"image_uri": "/elsewhere/IM7.dcm", "run_id": live.run_id},
        "not-ours": {"image_uri": "/elsewhere/IM8.dcm", "run_id": live.run_id, "pixels": None},
    }
    for name, claim in claims.items():
        storage.write_bytes(layout.instance_entry(version, planted[name]), json.dumps(
            {"sop_instance_uid": planted[name], "pixels": pixels[name], **claim}).encode())
    blocked, blocked_uid = chest_dicom(10)
    (incoming / "blocked.dcm").write_bytes(blocked)
    storage.write_bytes(layout.instance_entry(version, blocked_uid) + "/inside", b"")  # a folder where its claim goes
    with caplog.at_level("ERROR"):
        summary = run_screen(str(incoming), results, model_store)
    leases.close_run(results, live.run_id)
    assert summary.screened == 5 and summary.duplicates == 0
    statuses = {Path(row["image_uri"]).stem: row["status"] for row in run_rows(results) if row["run_id"] == summary.run_id}
    assert statuses == dict.fromkeys([*planted, "blocked"], "ok")
    set_aside = list(storage.list_files(layout.quarantine(version)))
    assert len(set_aside) == 5 and all("/instance-" in uri for uri in set_aside)  # the folder's name kept too
    for expected in ("whose row is of another instance", "which has no ledger entry", "not a claim of instance",
                     "which is open and never set out to screen it",
                     f"{incoming / 'blocked.dcm'} is screened"):
        assert expected in caplog.text
    # The claims now name the inputs that screened them.
    for name, uid in planted.items():
        claim = json.loads(storage.read_bytes(layout.instance_entry(version, uid)))
        assert claim["image_uri"] == str(incoming / f"{name}.dcm") and claim["run_id"] == summary.run_id
