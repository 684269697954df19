"""The same DICOM instance (SOP Instance UID) under two locations is screened once per model
version (screening/ledger.py ``InstanceClaims``): the second location gets a "duplicate" row naming
the first, and a claim that proves nothing (forged, or left by a run that died before its row) never
stops an image from being screened."""

from __future__ import annotations

import json

import numpy as np
import pytest

from screening.results import ResultsLayout
from store import storage
from store.phantoms import chest_phantom
from tests.dicom_builder import dicom_bytes, radiograph
from tests.test_screen_flow import run_rows, run_screen

pytestmark = pytest.mark.slow


def chest_dicom(seed: int) -> tuple[bytes, str]:
    pixels = chest_phantom(np.random.default_rng(seed), 128).astype(np.uint16) * 16
    dataset = radiograph(pixels, bits_stored=12, ViewPosition="PA", BodyPartExamined="CHEST")
    return dicom_bytes(dataset), str(dataset.SOPInstanceUID)


def test_the_same_instance_from_a_second_location_is_not_screened_again(model_store, tmp_path):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    (incoming / "export").mkdir(parents=True)
    first, uid = chest_dicom(1)
    (incoming / "export" / "IM0001.dcm").write_bytes(first)
    other, other_uid = chest_dicom(2)
    (incoming / "export" / "IM0002.dcm").write_bytes(other)
    night = run_screen(str(incoming), results, model_store)
    assert night.screened == 2 and night.duplicates == 0

    # The same instance arrives again under another name (a second export, a re-sent study), next to a
    # copy made the same night: both are the one already screened.
    (incoming / "resent").mkdir()
    (incoming / "resent" / "copy.dcm").write_bytes(first)
    (incoming / "resent" / "copy-2.dcm").write_bytes(first)
    again = run_screen(str(incoming), results, model_store)
    assert again.screened == 0 and again.duplicates == 2 and again.flagged == 0
    rows = {row["image_uri"]: row for row in run_rows(results)}
    original = str(incoming / "export" / "IM0001.dcm")
    for name in ("copy.dcm", "copy-2.dcm"):
        row = rows[str(incoming / "resent" / name)]
        assert row["status"] == "duplicate" and row["same_as"] == original and row["sop_instance_uid"] == uid
        assert row["prob_covid"] == "" and row["flagged"] == "False" and night.run_id in row["reason"]
    assert rows[original]["status"] == "ok" and rows[original]["prob_covid"] != ""
    assert {row["sop_instance_uid"] for row in rows.values() if row["status"] == "ok"} == {uid, other_uid}

    # Each location has its row: nothing is read again the night after.
    third = run_screen(str(incoming), results, model_store)
    assert third.to_screen == 0 and len(run_rows(results)) == 4


def test_a_claim_that_proves_nothing_is_set_aside_and_the_image_screened(model_store, tmp_path, caplog):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    incoming.mkdir()
    seed, _ = chest_dicom(3)
    (incoming / "seed.dcm").write_bytes(seed)
    version = run_screen(str(incoming), results, model_store).model_version
    layout = ResultsLayout(results)
    forged_data, forged_uid = chest_dicom(4)
    left_data, left_uid = chest_dicom(5)
    # A planted claim naming an input that was never screened, one naming another instance's row, and
    # one a run left when it died before its row (its run neither open nor published).
    storage.write_bytes(layout.instance_entry(version, forged_uid), json.dumps(
        {"sop_instance_uid": forged_uid, "image_uri": str(incoming / "seed.dcm"), "run_id": "somebody"}).encode())
    storage.write_bytes(layout.instance_entry(version, left_uid), json.dumps(
        {"sop_instance_uid": left_uid, "image_uri": "/gone/IM9.dcm", "run_id": "20261201T000000Z-dead"}).encode())
    (incoming / "new.dcm").write_bytes(forged_data)
    (incoming / "left.dcm").write_bytes(left_data)
    with caplog.at_level("ERROR"):
        summary = run_screen(str(incoming), results, model_store)
    assert summary.screened == 2 and summary.duplicates == 0
    statuses = {row["image_uri"]: row["status"] for row in run_rows(results)}
    assert statuses[str(incoming / "new.dcm")] == statuses[str(incoming / "left.dcm")] == "ok"
    set_aside = list(storage.list_files(layout.quarantine(version)))
    assert len(set_aside) == 2 and all("/instance-" in uri for uri in set_aside)
    assert "whose row is of another instance" in caplog.text and "which has no ledger entry" in caplog.text
    # The claims now name the inputs that screened them.
    for uid, name in ((forged_uid, "new.dcm"), (left_uid, "left.dcm")):
        claim = json.loads(storage.read_bytes(layout.instance_entry(version, uid)))
        assert claim["image_uri"] == str(incoming / name) and claim["run_id"] == summary.run_id
