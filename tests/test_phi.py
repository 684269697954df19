"""No patient name, id or birth date from a DICOM header reaches any output, log or the Prefect database.

The real command line screens, with a tiny model (the session's, copied), DICOM files whose
headers carry distinctive identifiers, in patient tags and in other text tags, some well formed, some
not, one with broken pixel data, one cut short; with its own PREFECT_HOME (so its own temporary
server and sqlite database) and Prefect logging at DEBUG. Then every byte it left is searched:
results (predictions, summary, report, ledger, part files), the whole PREFECT_HOME (database,
write-ahead log, stored results), and the command's stdout and stderr.

A second screen puts a name into header fields the decoder reports on (photometric interpretation,
SOP class, transfer syntax, number of frames, modality, body part): a rejection reason or a warning
must not echo them.

The rows carry where PACS keeps each DICOM study (UIDs, accession number, view position), and nothing
of the patient: a lateral view and a CT are rejected with their reasons, a name or an over-long id
in those fields is dropped, and with ``--deidentify`` the identifiers are keyed hashes that reach no
output in the clear.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cli.lifeline import MARK
from store.phantoms import chest_phantom
from tests import dicom_builder
from tests.conftest import copy_tree

pytestmark = pytest.mark.slow

# Identifiers, one word each (a wrapped log line or a formatted person name still holds each word whole).
PATIENT_A = {"family": "Qwyzzlebottom", "given": "Xanthippe", "id": "PIDQ7X3K9Z", "birth": "19330517"}
PATIENT_B = {"family": "Ñuñezvrotsky", "given": "Zoëlline", "id": "MRN88Z1W4Y", "birth": "19470902"}
PATIENT_C = {"family": "Bramblewick", "given": "Oswinthe", "id": "PIDC55R7TQ", "birth": "19290311"}
PATIENT_D = {"family": "Fennimorex", "given": "Ludovica", "id": "PIDD31K8WN", "birth": "19511224"}
PATIENT_E = {"family": "Grottlewane", "given": "Perpetuaz", "id": "LONGPIDK4W2" + "7" * 60, "birth": "17.05.1921"}
HEADER_TAGS = [PATIENT_A, PATIENT_B, PATIENT_C, PATIENT_D, PATIENT_E]
# Header fields a decoder reports on, each holding a patient's name; one file each.
ECHOED = {"PhotometricInterpretation": "Zorblattnik", "SOPClassUID": "Quendrilax",
          "TransferSyntaxUID": "Vexmortain", "NumberOfFrames": "Halvorsquin", "Modality": "Brisquenhoff",
          "BodyPartExamined": "Tandelmoor"}
# Where PACS keeps the studies: one study (two series: PA and lateral) for patient A, a CT for patient B.
STUDY_A = {"StudyInstanceUID": "1.2.826.0.1.3680043.10.77.1", "AccessionNumber": "ACC77001"}
PA_A = {**STUDY_A, "SeriesInstanceUID": "1.2.826.0.1.3680043.10.77.1.1", "ViewPosition": "PA"}
LATERAL_A = {**STUDY_A, "SeriesInstanceUID": "1.2.826.0.1.3680043.10.77.1.2", "ViewPosition": "LL"}
CT_B = {"StudyInstanceUID": "1.2.826.0.1.3680043.10.78.1", "SeriesInstanceUID": "1.2.826.0.1.3680043.10.78.1.1",
        "AccessionNumber": "ACC78001", "Modality": "CT"}
KEY = "the site's de-identification key, kept by the site"


@dataclass
class Screened:
    incoming: Path
    results: Path
    prefect_home: Path
    output: bytes  # the screen command's stdout and stderr
    rows: dict[str, dict]  # file name -> its predictions.csv row


def radiograph(patient: dict[str, str], broken_pixels: bool = False, **header: str | bytes | None) -> bytes:
    """A DICOM radiograph whose patient and text tags carry ``patient``; ``header`` overrides
    (``TransferSyntaxUID`` goes into the file meta, ``None`` leaves the element out, bytes are
    written as they are: a number field holding text)."""
    family, given, patient_id, birth = patient["family"], patient["given"], patient["id"], patient["birth"]
    pixels = chest_phantom(np.random.default_rng(len(family)), 128).astype(np.uint16) * 16
    tags = {"SpecificCharacterSet": "ISO_IR 192",  # UTF-8
            "BodyPartExamined": "CHEST", "PatientName": f"{family}^{given}", "PatientID": patient_id,
            "PatientBirthDate": birth, "OtherPatientIDs": patient_id, "PatientComments": f"{given} {family}, born {birth}",
            "StudyDescription": f"CXR PA {patient_id} {family}", "SeriesDescription": f"{given} {birth}",
            "InstitutionName": f"{family} memorial", "ReferringPhysicianName": f"{given}^{family}",
            "ImageComments": f"taken for {family} {patient_id} ({birth}); " + "padding " * 20}
    dataset = dicom_builder.radiograph(pixels, bits_stored=12, **{**tags, **header})
    if broken_pixels:
        dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    return dicom_builder.dicom_bytes(dataset)


def cut_short(data: bytes, patient: dict[str, str]) -> bytes:
    """The file ends inside ImageComments, after the patient tags."""
    at = data.index(b"padding padding")
    assert data.rindex(patient["family"].encode()) < at
    return data[:at]


def base64_forms(token: str) -> list[bytes]:
    """What base64 of data holding ``token`` contains whatever surrounds it, at each of the three
    alignments (Prefect keeps stored results as base64 in JSON)."""
    raw = token.encode()
    forms = []
    for skip in range(3):
        whole = raw[skip:][: (len(raw) - skip) // 3 * 3]  # the token's bytes that fill whole groups
        forms.append(base64.b64encode(whole))
    return forms


def leaks(patients: list[dict[str, str]], places: dict[str, bytes]) -> list[str]:
    """'token in place' for each identifier found: as UTF-8 or Latin-1 text in any case, as a JSON
    escape, in base64, or, for a token with letters, with whitespace taken out (a line wrapped inside
    it; taken out around digits it would make dates out of unrelated numbers)."""
    found = []
    for place, data in places.items():
        text = data.decode("utf-8", errors="replace").casefold()
        squeezed = "".join(text.split())
        for patient in patients:
            for token in patient.values():
                forms = {token.casefold(), json.dumps(token)[1:-1].casefold()}
                texts = (text, squeezed) if not token.isdigit() else (text,)
                raw = [token.encode("latin-1", errors="ignore"), *base64_forms(token)]
                if any(form in haystack for form in forms for haystack in texts) or any(r in data for r in raw):
                    found.append(f"{token!r} in {place}")
    return found


def every_file(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def run(command: list[str], environment: dict[str, str], cwd: Path, check: bool = True) -> bytes:
    finished = subprocess.run(command, env=environment, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=800)
    assert finished.returncode == 0 or not check, finished.stdout.decode(errors="replace")[-4000:]
    return finished.stdout


@dataclass
class Command:
    """The real command line, run in ``root`` with its own PREFECT_HOME (so its own temporary server
    and database) and Prefect logging at DEBUG; a tiny model (32 px, no pretrained weights) in models/."""
    root: Path
    environment: dict[str, str]
    executable: str

    def screen(self, files: dict[str, bytes], name: str, check: bool = True, options: tuple[str, ...] = (),
               environment: dict[str, str] | None = None) -> Screened:
        incoming = self.root / f"incoming-{name}"
        for relative, data in files.items():
            (incoming / relative).parent.mkdir(parents=True, exist_ok=True)
            (incoming / relative).write_bytes(data)
        results = self.root / f"results-{name}"
        output = run([self.executable, "screen", str(incoming), "--results", str(results), "--model-store",
                      "models", "--explain", "all", "--chunk-size", "2", "--batch-size", "2", *options],
                     {**self.environment, **(environment or {})}, self.root, check)
        (self.root / f"screen-{name}.log").write_bytes(output)  # kept to read a failure by
        # De-identified rows name each input by a keyed token of its location: the test knows the key.
        tokens = {}
        if "--deidentify" in options and (environment or {}).get("CXR_DEIDENTIFY_KEY"):
            tokens = {hmac.new(environment["CXR_DEIDENTIFY_KEY"].encode(), str(incoming / relative).encode(),
                               hashlib.sha256).hexdigest()[:40]: Path(relative).name for relative in files}
        rows = {}
        for predictions in results.rglob("predictions.csv"):
            for row in csv.DictReader(io.StringIO(predictions.read_text())):
                token = row["image_uri"].removeprefix("deidentified:")
                rows[tokens[token] if tokens else Path(row["image_uri"]).name] = row
        return Screened(incoming, results, self.root / "prefect-home", output, rows)


@pytest.fixture(scope="module")
def command(tmp_path_factory, model_store) -> Command:
    root = tmp_path_factory.mktemp("phi")
    executable = shutil.which("cxr-screen", path=str(Path(sys.executable).parent))
    assert executable, "the cxr-screen entry point is not installed in this environment"
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_API_", "AWS_")) and name != MARK}
    environment.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_LOGGING_LEVEL="DEBUG", COLUMNS="200")
    copy_tree(model_store, str(root / "models"))
    return Command(root, environment, executable)


@pytest.fixture(scope="module")
def tagged_files() -> dict[str, bytes]:
    return {
        "ward/a.dcm": radiograph(PATIENT_A, **PA_A),
        "ward/a-lateral.dcm": radiograph(PATIENT_A, **LATERAL_A),
        "ward/IM0002": radiograph(PATIENT_B),  # found by its preamble; UTF-8 names
        "ward/b-ct.dcm": radiograph(PATIENT_B, **CT_B),
        "ward/c.dcm": radiograph(PATIENT_C, broken_pixels=True),
        "ward/d.dcm": cut_short(radiograph(PATIENT_D), PATIENT_D),
        # Malformed birth date, over-long id, and a name or that id where the study's identifiers go.
        "ward/e.dcm": radiograph(PATIENT_E, ViewPosition=PATIENT_E["family"], AccessionNumber=PATIENT_E["id"],
                                 StudyInstanceUID=PATIENT_E["birth"]),
    }


@pytest.fixture(scope="module")
def screened(command, tagged_files) -> Screened:
    return command.screen(tagged_files, "tags")


def places(screened: Screened) -> dict[str, bytes]:
    found = {"the screen command's stdout and stderr": screened.output}
    found.update(every_file(screened.results))
    found.update(every_file(screened.prefect_home))
    assert any(name.endswith(".db") for name in found), "no Prefect database found under PREFECT_HOME"
    return found


def test_the_identifiers_are_there_to_be_found(screened, tagged_files):
    """The search finds every identifier in the inputs (the four of its patient in each file), and
    each kind of input got its row."""
    assert len(leaks(HEADER_TAGS, every_file(screened.incoming))) == 4 * len(tagged_files)
    assert {name: row["status"] for name, row in screened.rows.items()} == {
        "a.dcm": "ok", "a-lateral.dcm": "rejected", "IM0002": "ok", "b-ct.dcm": "rejected", "c.dcm": "rejected",
        "d.dcm": "rejected", "e.dcm": "ok"}
    assert "pixel data" in screened.rows["c.dcm"]["reason"]


IDENTIFIERS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number", "view_position")


def test_rows_say_where_pacs_keeps_each_study_and_a_lateral_view_and_a_ct_are_rejected(screened):
    rows = screened.rows
    assert (rows["a.dcm"]["study_instance_uid"], rows["a.dcm"]["series_instance_uid"],
            rows["a.dcm"]["accession_number"], rows["a.dcm"]["view_position"]) == (
        STUDY_A["StudyInstanceUID"], PA_A["SeriesInstanceUID"], "ACC77001", "PA")
    assert rows["a-lateral.dcm"]["reason"] == "not a frontal chest X-ray: lateral view (DICOM ViewPosition LL)"
    assert (rows["a-lateral.dcm"]["study_instance_uid"], rows["a-lateral.dcm"]["view_position"]) == (
        STUDY_A["StudyInstanceUID"], "LL")  # the rejected view is still found in PACS
    assert rows["b-ct.dcm"]["reason"] == "not a frontal chest X-ray: DICOM Modality CT, not CR, DX or DR"
    assert rows["b-ct.dcm"]["accession_number"] == "ACC78001"
    for name, row in rows.items():
        assert row["sop_instance_uid"].startswith("1.2.826.0.1.3680043.") or name == "d.dcm", name
    # A name, an over-long id or a birth date where an identifier goes is dropped, never quoted.
    assert [rows["e.dcm"][name] for name in IDENTIFIERS[:2] + IDENTIFIERS[3:]] == ["", "", "", "other"]
    assert all(rows["IM0002"][name] == "" for name in IDENTIFIERS if name != "sop_instance_uid")
    report = (next(screened.results.rglob("report.html"))).read_text()
    assert "accession ACC77001" in report  # beside the path, in the rejected inputs at least


def test_no_patient_identifier_in_outputs_logs_or_the_prefect_database(screened):
    assert leaks(HEADER_TAGS, places(screened)) == []


def test_header_fields_a_decoder_reports_on_are_not_echoed(command):
    """Any header field can hold anything, a name included: a rejection reason or log line names the
    problem, never the value. One file per field, each with the name in its patient tags as well."""
    names = [{"name": token} for token in ECHOED.values()]
    files = {}
    for keyword, token in ECHOED.items():
        header: dict[str, str | bytes | None] = {keyword: token}
        if keyword == "NumberOfFrames":
            header[keyword] = (token + " " * (len(token) % 2)).encode()
        if keyword == "SOPClassUID":
            header["PixelData"] = None  # reported as "DICOM without pixel data (<the SOP class's name>)"
        patient = {"family": token, "given": "Echo", "id": f"PID{token.upper()}", "birth": "19010101"}
        files[f"{keyword}.dcm"] = radiograph(patient, **header)
    screened = command.screen(files, "echo", check=False)
    assert len(leaks(names, every_file(screened.incoming))) == len(names)
    assert screened.rows["Modality.dcm"]["reason"].endswith("DICOM Modality (non-standard value), not CR, DX or DR")
    reasons = {name: (row["status"], row["reason"]) for name, row in screened.rows.items()}
    assert all(status == "rejected" for status, _ in reasons.values()) and len(reasons) == len(files), (
        reasons, screened.output.decode(errors="replace")[-3000:])
    assert leaks(names, places(screened)) == []


def test_deidentified_rows_carry_keyed_tokens_and_the_raw_identifiers_reach_no_output(command, screened,
                                                                                      tagged_files):
    """The same files again with --deidentify: every UID a 2.25 token, the accession numbers
    hexadecimal, the same study the same token, and no raw UID or accession number anywhere. Nor
    the file's location: a folder named for the patient and a file named for the accession and the
    SOP UID reach no row, ledger entry, chunk record, part file, report, log or Prefect record."""
    clear = screened.rows
    named = {"PATQ55123456_DOEWAXLEY_JOHNATHAR/ACCZ998877_1.2.826.0.1.3680043.10.79.1.1.1.dcm": radiograph(PATIENT_C)}
    hidden = command.screen({**tagged_files, **named}, "deidentified", options=("--deidentify",),
                            environment={"CXR_DEIDENTIFY_KEY": KEY})
    rows = hidden.rows
    assert all(row["image_uri"].startswith("deidentified:") for row in rows.values())
    location = {"folder": "PATQ55123456", "name": "DOEWAXLEY", "given": "JOHNATHAR", "accession": "ACCZ998877",
                "uid": "1.2.826.0.1.3680043.10.79.1.1.1"}
    assert leaks([location], {**every_file(hidden.results), **every_file(hidden.prefect_home),
                              "the screen command's stdout and stderr": hidden.output}) == []
    assert Path(next(iter(named))).name in rows  # it was screened, under its token
    rows = {name: row for name, row in rows.items() if name in clear}
    assert {name: row["status"] for name, row in rows.items()} == {name: row["status"] for name, row in clear.items()}
    for name, row in rows.items():
        for field in IDENTIFIERS[:3]:
            assert row[field] == "" or (row[field].startswith("2.25.") and row[field] != clear[name][field]), name
        assert row["accession_number"] == "" or len(row["accession_number"]) == 16
        assert row["view_position"] == clear[name]["view_position"]  # not an identifier
    assert rows["a.dcm"]["study_instance_uid"] == rows["a-lateral.dcm"]["study_instance_uid"] != ""
    assert rows["a.dcm"]["accession_number"] == rows["a-lateral.dcm"]["accession_number"] != ""
    assert rows["a.dcm"]["series_instance_uid"] != rows["a-lateral.dcm"]["series_instance_uid"]
    raw = [{field: row[field] for field in IDENTIFIERS[:4] if row[field]} for row in clear.values()]
    found = {**every_file(hidden.results), "the screen command's stdout and stderr": hidden.output}
    assert leaks([identifiers for identifiers in raw if identifiers], found) == []
    assert leaks(HEADER_TAGS, found) == []


def test_deidentification_without_a_key_screens_nothing(command):
    refused = command.screen({"ward/a.dcm": radiograph(PATIENT_A, **PA_A)}, "no-key", check=False,
                             options=("--deidentify",), environment={"CXR_DEIDENTIFY_KEY": ""})
    assert b"CXR_DEIDENTIFY_KEY" in refused.output and refused.rows == {}
