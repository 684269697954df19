"""A PACS as the night's source (store/dicomweb.py): a real Orthanc with its DICOMweb plugin,
authentication on, started by the test on 127.0.0.1; screening lists the night's instances with
QIDO-RS, reads them with WADO-RS into the same decoder and guards as files, and screens each once.
Skips, saying so, where Debian's orthanc and orthanc-dicomweb are not installed."""

from __future__ import annotations

import base64
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from store import storage
from store.phantoms import chest_phantom
from tests.conftest import _free_port
from tests.dicom_builder import dicom_bytes, radiograph
from tests.test_screen_flow import run_rows, run_screen

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from deployments import orthanc

    folder = tmp_path_factory.mktemp("orthanc")
    try:
        server = orthanc.configure(folder / "pacs", _free_port(), dicom_port=_free_port())
    except orthanc.OrthancError as error:
        pytest.skip(str(error))
    process = orthanc.start(server, folder / "orthanc.log")
    try:
        # Orthanc gets the process basics alone, never the tester's (or an operator's) keys.
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
        assert names <= {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"}, names
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture
def credentials(pacs, monkeypatch):
    monkeypatch.setenv("CXR_DICOMWEB_USER", pacs.user)
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", pacs.password)


def send(pacs, **header) -> str:
    """One chest radiograph into the PACS (its REST API, as a modality's export would); its SOP UID."""
    pixels = chest_phantom(np.random.default_rng(sum(header.get("AccessionNumber", "").encode())), 128)
    dataset = radiograph(pixels.astype(np.uint16) * 16, bits_stored=12, **{
        "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "PatientID": "P-1",
        "StudyDate": "20261205", "AccessionNumber": "ACC-1", "ViewPosition": "PA", "BodyPartExamined": "CHEST",
        **header})
    token = base64.b64encode(f"{pacs.user}:{pacs.password}".encode()).decode()
    request = urllib.request.Request(f"{pacs.url}/instances", data=dicom_bytes(dataset), method="POST",
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    return str(dataset.SOPInstanceUID)


def test_a_night_from_the_pacs_is_screened_once(pacs, credentials, model_store, tmp_path):
    night = [send(pacs, AccessionNumber=f"N1-{number}", StudyDate="20261205") for number in range(3)]
    night.append(send(pacs, AccessionNumber="N1-lateral", ViewPosition="LL"))  # refused by the view guard
    send(pacs, AccessionNumber="old", StudyDate="20250101")  # outside the night's window
    location = f"{pacs.dicomweb}?StudyDate=20261201-"
    results = str(tmp_path / "results")

    summary = run_screen(location, results, model_store)
    rows = {row["sop_instance_uid"]: row for row in run_rows(results)}
    assert summary.status == "completed" and set(rows) == set(night), [row["accession_number"] for row in rows.values()]
    assert {uid: row["status"] for uid, row in rows.items()} == {**dict.fromkeys(night[:3], "ok"), night[3]: "rejected"}
    for uid, row in rows.items():  # each row names its instance by its WADO-RS path, and no credential
        assert row["image_uri"].startswith(pacs.dicomweb + "/studies/") and row["image_uri"].endswith(f"/instances/{uid}")
        assert pacs.password not in str(row)
    assert "lateral" in rows[night[3]]["reason"] or "view" in rows[night[3]]["reason"], rows[night[3]]["reason"]

    again = run_screen(location, results, model_store)  # nothing new: nothing screened twice
    assert again.screened == 0 and len(run_rows(results)) == len(night)
    newcomer = send(pacs, AccessionNumber="N2-1", StudyDate="20261206")
    run_screen(location, results, model_store)
    assert [row["sop_instance_uid"] for row in run_rows(results)].count(newcomer) == 1


def test_without_the_pacs_credentials_the_run_fails_naming_the_setting(pacs, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_DICOMWEB_USER", pacs.user)
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", "guessed")
    with pytest.raises(storage.AccessDenied, match="CXR_DICOMWEB_USER"):
        list(storage.list_files(pacs.dicomweb))
    with pytest.raises(storage.LocationError, match="credentials do not belong in a location"):
        list(storage.list_files(pacs.dicomweb.replace("://", f"://{pacs.user}:{pacs.password}@")))
    with pytest.raises(storage.LocationError, match="cannot filter on PatientName"):
        list(storage.list_files(f"{pacs.dicomweb}?PatientName=DOE"))
    with pytest.raises(storage.LocationError, match="read-only"):
        storage.write_bytes(f"{pacs.dicomweb}/studies/1/series/2/instances/3", b"x")


def test_a_nightly_window_asks_the_pacs_for_recent_studies_only(pacs, credentials, model_store, tmp_path):
    import datetime

    from store.dicomweb import dated_since

    today = datetime.date.today()
    assert dated_since("dicomweb+http://h/dicom-web", "1d", datetime.date(2026, 3, 1)) == \
        "dicomweb+http://h/dicom-web?StudyDate=20260228-"
    assert dated_since("dicomweb+http://h/r?Modality=DX", "2w", datetime.date(2026, 3, 1)).endswith(
        "?Modality=DX&StudyDate=20260215-")
    with pytest.raises(storage.LocationError, match="either StudyDate"):
        dated_since("dicomweb+http://h/r?StudyDate=2026-", "1d", today)
    recent = send(pacs, AccessionNumber="W-recent", StudyDate=today.strftime("%Y%m%d"))
    send(pacs, AccessionNumber="W-old", StudyDate=(today - datetime.timedelta(days=10)).strftime("%Y%m%d"))
    results = str(tmp_path / "results")
    summary = run_screen(pacs.dicomweb, results, model_store, since="2d")
    assert summary.incoming_uri.endswith(f"?StudyDate={(today - datetime.timedelta(days=2)):%Y%m%d}-")
    assert recent in {row["sop_instance_uid"] for row in run_rows(results)}
    assert "W-old" not in {row["accession_number"] for row in run_rows(results)}
    with pytest.raises(ValueError, match="since=1d is for a PACS location"):
        run_screen(str(tmp_path), results, model_store, since="1d")


def orthanc_instances(pacs, modality: str) -> list[bytes]:
    """Every instance of ``modality`` Orthanc holds, as files (its REST API, as an administrator would look)."""
    import json

    token = base64.b64encode(f"{pacs.user}:{pacs.password}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    query = urllib.request.Request(f"{pacs.url}/tools/find", method="POST", headers=headers, data=json.dumps(
        {"Level": "Instance", "Query": {"Modality": modality}}).encode())
    with urllib.request.urlopen(query, timeout=30) as response:
        found = json.loads(response.read())
    files = []
    for instance in found:
        with urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{instance}/file", headers=headers),
                                    timeout=30) as response:
            files.append(response.read())
    return files


def test_results_go_back_to_the_pacs_once_and_a_pacs_that_is_down_costs_nothing(pacs, credentials, model_store,
                                                                              tmp_path):
    import io
    import json
    import subprocess
    import sys

    from pydicom import dcmread

    from screening import delivery
    from screening.dicom_results import read_report

    night = [send(pacs, AccessionNumber=f"D1-{number}", StudyDate="20300107") for number in range(4)]
    location, results = f"{pacs.dicomweb}?StudyDate=20300107-20300131", str(tmp_path / "results")
    summary = run_screen(location, results, model_store, deliver_to=pacs.dicomweb)
    rows = {row["sop_instance_uid"]: row for row in run_rows(results)}
    assert set(rows) == set(night) and summary.delivery["delivered"] == summary.delivery["prepared"] == 4
    assert {row["delivery"] for row in rows.values()} == {"delivered"}  # each row says so
    assert delivery.entries(results) == [] and delivery.delivered_count(results) == 4  # none left to read nightly
    reports = [read_report(dcmread(io.BytesIO(data))) for data in orthanc_instances(pacs, "SR")]
    mine = {report["source_sop_instance_uid"]: report for report in reports if report["source_sop_instance_uid"] in rows}
    assert set(mine) == set(night)  # one report per image, referencing it
    for uid, report in mine.items():
        assert report["present"] == (rows[uid]["flagged"] == "True"), (report, rows[uid]["flagged"])
        assert report["probability"] == pytest.approx(float(rows[uid]["prob_covid"]), abs=1e-6)
    captures = [dcmread(io.BytesIO(data)) for data in orthanc_instances(pacs, "OT")]
    flagged = {uid for uid, row in rows.items() if row["flagged"] == "True"}
    assert len(captures) == len(flagged) and all("NOT FOR DIAGNOSIS" in capture.SeriesDescription for capture in captures)

    # Again: nothing new to screen or send, and the PACS holds no second copy; its objects are not inputs.
    again = run_screen(location, results, model_store, deliver_to=pacs.dicomweb)
    assert again.screened == 0 and again.delivery["prepared"] == again.delivery["delivered"] == 0
    assert len(orthanc_instances(pacs, "SR")) == len(reports) and len(orthanc_instances(pacs, "OT")) == len(captures)

    # A PACS that does not answer: the run completes with its rows; the objects wait, then go.
    late = send(pacs, AccessionNumber="D2-1", StudyDate="20300108")
    down = f"dicomweb+http://127.0.0.1:{_free_port()}/dicom-web"
    missed = run_screen(location, results, model_store, deliver_to=down, delivery_max_nights=2)
    assert missed.status == "completed" and late in {row["sop_instance_uid"] for row in run_rows(results)}
    assert missed.delivery["pending"] == 1 and missed.delivery["delivered"] == 0
    assert {row["sop_instance_uid"]: row["delivery"] for row in run_rows(results)}[late] == "pending"
    environment = {**os.environ, "COLUMNS": "200"}
    shown = subprocess.run([sys.executable, "-m", "cli.main", "deliveries", results, "--json"], cwd=ROOT, env=environment,
                           capture_output=True, text=True, timeout=120, check=False)
    (pending,) = [entry for entry in json.loads(shown.stdout)["deliveries"] if entry["status"] == "pending"]
    assert shown.returncode == 0 and pending["sop_instance_uid"] == late and "did not answer" in pending["last_error"]
    dead = run_screen(location, results, model_store, deliver_to=down, delivery_max_nights=2)
    assert dead.delivery["dead"] == 1 and dead.delivery["dead_entries"][0]["sop_instance_uid"] == late
    page = storage.read_bytes(dead.outputs["report.html"]).decode()  # the dead-letter list, in the report
    assert "1 images' results could not be delivered" in page and late in page, page[:2000]
    shown = subprocess.run([sys.executable, "-m", "cli.main", "deliveries", results], cwd=ROOT, env=environment,
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 1 and "1 dead" in shown.stdout, shown.stdout
    retried = subprocess.run([sys.executable, "-m", "cli.main", "deliveries", results, "--retry"], cwd=ROOT,
                             env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert retried.returncode == 0 and "1 dead deliveries go to the next runs again" in retried.stdout
    back = run_screen(location, results, model_store, deliver_to=pacs.dicomweb)
    assert back.delivery["delivered"] == 1 and back.delivery["pending"] == back.delivery["dead"] == 0
    assert late in {read_report(dcmread(io.BytesIO(data)))["source_sop_instance_uid"]
                    for data in orthanc_instances(pacs, "SR")}
    assert len(run_rows(results)) == 5  # the rows, whatever happened to the deliveries


def test_results_go_to_a_pacs_over_dimse_from_a_known_ae_title_only(pacs, credentials, model_store, tmp_path,
                                                                    monkeypatch):
    import io

    from pydicom import dcmread

    from screening.dicom_results import read_report

    image = send(pacs, AccessionNumber="C1-1", StudyDate="20310109")
    location, results = f"{pacs.dicomweb}?StudyDate=20310109-", str(tmp_path / "results")
    destination = f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    monkeypatch.setenv("CXR_DICOM_CALLING_AET", "STRANGER")
    refused = run_screen(location, results, model_store, deliver_to=destination)
    assert refused.status == "completed" and refused.delivery["pending"] == 1
    monkeypatch.setenv("CXR_DICOM_CALLING_AET", "CXRSCREEN")
    stored = run_screen(location, results, model_store, deliver_to=destination)
    assert stored.delivery["delivered"] == 1 and stored.delivery["pending"] == 0
    assert image in {read_report(dcmread(io.BytesIO(data)))["source_sop_instance_uid"]
                     for data in orthanc_instances(pacs, "SR")}


def test_a_destination_that_refuses_the_credentials_leaves_the_rows_and_waits_for_a_person(
        pacs, credentials, model_store, tmp_path):
    from deployments import orthanc

    other = orthanc.configure(tmp_path / "other-pacs", _free_port())  # a PACS with a password we do not have
    process = orthanc.start(other, tmp_path / "other.log")
    try:
        image = send(pacs, AccessionNumber="R1-1", StudyDate="20320110")
        location, results = f"{pacs.dicomweb}?StudyDate=20320110-", str(tmp_path / "results")
        summary = run_screen(location, results, model_store, deliver_to=other.dicomweb, delivery_max_nights=1)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    (row,) = run_rows(results)
    assert summary.status == "completed" and row["status"] == "ok" and row["sop_instance_uid"] == image
    assert row["delivery"] == "dead" and summary.delivery["dead"] == 1  # refused: no retry within the night
    (entry,) = summary.delivery["dead_entries"]
    assert "refused the credentials (401)" in entry["last_error"] and entry["nights"] == 1, entry


def test_an_instance_screened_from_a_folder_export_is_not_screened_again_from_the_pacs_but_delivered(
        pacs, credentials, model_store, tmp_path):
    import io

    from pydicom import dcmread

    from screening.dicom_results import read_report

    pixels = chest_phantom(np.random.default_rng(7), 128)
    dataset = radiograph(pixels.astype(np.uint16) * 16, bits_stored=12, StudyInstanceUID=generate_uid(),
                         SeriesInstanceUID=generate_uid(), PatientID="P-2", StudyDate="20330111",
                         AccessionNumber="E1-1", ViewPosition="PA", BodyPartExamined="CHEST")
    export = tmp_path / "export"
    export.mkdir()
    (export / "IM0001.dcm").write_bytes(dicom_bytes(dataset))  # the modality's folder export, screened first
    results = str(tmp_path / "results")
    first = run_screen(str(export), results, model_store)
    (screened,) = run_rows(results)
    assert first.screened == 1 and screened["status"] == "ok"

    token = base64.b64encode(f"{pacs.user}:{pacs.password}".encode()).decode()
    request = urllib.request.Request(f"{pacs.url}/instances", data=dicom_bytes(dataset), method="POST",
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/dicom"})
    urllib.request.urlopen(request, timeout=30).close()  # the same instance, sent to the PACS
    second = run_screen(f"{pacs.dicomweb}?StudyDate=20330111-", results, model_store, deliver_to=pacs.dicomweb)
    rows = {row["image_uri"]: row for row in run_rows(results)}
    (from_pacs,) = [row for uri, row in rows.items() if uri.startswith(pacs.dicomweb)]
    assert second.screened == 0 and second.duplicates == 1 and from_pacs["status"] == "duplicate"
    assert from_pacs["same_as"] == str(export / "IM0001.dcm") and from_pacs["delivery"] == "delivered"
    # The PACS gets the result of the one screening: the folder row's probability, referencing the instance.
    (report,) = [read_report(dcmread(io.BytesIO(data))) for data in orthanc_instances(pacs, "SR")
                 if read_report(dcmread(io.BytesIO(data)))["source_sop_instance_uid"] == str(dataset.SOPInstanceUID)]
    assert report["probability"] == pytest.approx(float(screened["prob_covid"]), abs=1e-6)
    assert report["present"] == (screened["flagged"] == "True")


def test_over_dicom_the_pacs_takes_stores_and_echoes_from_our_ae_title_and_answers_no_query(pacs, credentials):
    """DICOM has no password: a process on this machine calling as our AE title may store and echo,
    never list or fetch the studies the HTTP password guards; another AE title not even echo."""
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    send(pacs, AccessionNumber="Q1-1", StudyDate="20350113")

    def associate(calling: str):
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(Verification)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)

    ours = associate("CXRSCREEN")
    assert ours.is_established
    try:
        assert ours.send_c_echo().Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID, query.AccessionNumber = "STUDY", "", ""
        answers = list(ours.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        ours.release()
    matches = [identifier for status, identifier in answers if status and status.Status in (0xFF00, 0xFF01)]
    # Refused: a failure status, or (Orthanc 1.10) the association aborted with no answer at all.
    assert matches == [] and not any(status and status.Status == 0x0000 for status, _ in answers), answers
    stranger = associate("STRANGER")
    if stranger.is_established:  # Orthanc may take the association and refuse what is asked in it
        try:
            status = stranger.send_c_echo()
            assert not status or status.Status != 0x0000, status
        finally:
            stranger.release()


def test_pacs_credentials_never_go_into_parameters_and_delivery_needs_the_real_uids():
    from flows.parameters import ScreenParameters

    for given in ({"incoming_uri": "dicomweb+http://cxr:secret@pacs:8042/dicom-web"},
                  {"incoming_uri": "in", "deliver_to": "dicomweb+https://cxr:secret@pacs/dicom-web"}):
        with pytest.raises(ValueError, match="credentials do not belong in a location"):
            ScreenParameters(**given)
    with pytest.raises(ValueError, match="deliver_to and deidentify exclude each other"):
        ScreenParameters(incoming_uri="dicomweb+http://pacs/dicom-web", deliver_to="dimse://PACS@pacs:104",
                         deidentify=True)
    assert ScreenParameters(incoming_uri="in", deliver_to="dimse://PACS@pacs:104").deliver_to  # an AE title, no secret
