"""No patient name, id or birth date from a DICOM header reaches any output, log or the Prefect database.

The real command line trains a tiny model and screens DICOM files whose headers carry distinctive
identifiers, in patient tags and in other text tags, some well formed, some not, one with broken pixel
data, one cut short; with its own PREFECT_HOME (so its own temporary server and sqlite database) and
Prefect logging at DEBUG. Then every byte it left is searched: results (predictions, summary, report,
ledger, part files), the whole PREFECT_HOME (database, write-ahead log, stored results), and the
command's stdout and stderr.

A second screen puts a name into header fields the decoder reports on (photometric interpretation,
SOP class, transfer syntax, number of frames): a rejection reason or a warning must not echo them.
"""

from __future__ import annotations

import base64
import csv
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
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from flows.lifeline import MARK
from tasks.phantoms import chest_phantom, write_phantom_dataset

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
          "TransferSyntaxUID": "Vexmortain", "NumberOfFrames": "Halvorsquin"}


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
    with config.disable_value_validation():  # some values are malformed on purpose
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.SOPInstanceUID = generate_uid()
        dataset.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
        dataset.Modality = "DX"
        dataset.PatientName = f"{family}^{given}"
        dataset.PatientID = patient_id
        dataset.PatientBirthDate = birth
        dataset.OtherPatientIDs = patient_id
        dataset.PatientComments = f"{given} {family}, born {birth}"
        dataset.StudyDescription = f"CXR PA {patient_id} {family}"
        dataset.SeriesDescription = f"{given} {birth}"
        dataset.InstitutionName = f"{family} memorial"
        dataset.ReferringPhysicianName = f"{given}^{family}"
        dataset.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
        for keyword, value in header.items():
            if keyword == "TransferSyntaxUID":
                dataset.file_meta.TransferSyntaxUID = value
            elif value is None:
                delattr(dataset, keyword)
            elif isinstance(value, bytes):  # stored raw: pydicom would refuse text in a number field
                tag = Tag(keyword)
                dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
            else:
                setattr(dataset, keyword, value)
        if broken_pixels:
            dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
        dataset.ImageComments = f"taken for {family} {patient_id} ({birth}); " + "padding " * 20
        buffer = io.BytesIO()
        # The encoding is named: pydicom cannot infer it from a transfer syntax it does not know.
        dataset.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


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

    def screen(self, files: dict[str, bytes], name: str, check: bool = True) -> Screened:
        incoming = self.root / f"incoming-{name}"
        for relative, data in files.items():
            (incoming / relative).parent.mkdir(parents=True, exist_ok=True)
            (incoming / relative).write_bytes(data)
        results = self.root / f"results-{name}"
        output = run([self.executable, "screen", str(incoming), "--results", str(results), "--model-store",
                      "models", "--explain", "all", "--chunk-size", "2", "--batch-size", "2"],
                     self.environment, self.root, check)
        (self.root / f"screen-{name}.log").write_bytes(output)  # kept to read a failure by
        rows = {}
        for predictions in results.rglob("predictions.csv"):
            for row in csv.DictReader(io.StringIO(predictions.read_text())):
                rows[Path(row["image_uri"]).name] = row
        return Screened(incoming, results, self.root / "prefect-home", output, rows)


@pytest.fixture(scope="module")
def command(tmp_path_factory) -> Command:
    root = tmp_path_factory.mktemp("phi")
    executable = shutil.which("cxr-screen", path=str(Path(sys.executable).parent))
    assert executable, "the cxr-screen entry point is not installed in this environment"
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_API_", "AWS_")) and name != MARK}
    environment.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_LOGGING_LEVEL="DEBUG", COLUMNS="200")
    write_phantom_dataset(str(root / "dataset"), per_class=16, size=96, seed=11)
    run([executable, "train", "dataset", "--model-store", "models", "--input-size", "32", "--weights", "none",
         "--epochs", "3", "--augment-draws", "1", "--batch-size", "8"], environment, root)
    return Command(root, environment, executable)


@pytest.fixture(scope="module")
def screened(command) -> Screened:
    return command.screen({
        "ward/a.dcm": radiograph(PATIENT_A),
        "ward/IM0002": radiograph(PATIENT_B),  # found by its preamble; UTF-8 names
        "ward/c.dcm": radiograph(PATIENT_C, broken_pixels=True),
        "ward/d.dcm": cut_short(radiograph(PATIENT_D), PATIENT_D),
        "ward/e.dcm": radiograph(PATIENT_E),  # malformed birth date, over-long id
    }, "tags")


def places(screened: Screened) -> dict[str, bytes]:
    found = {"the screen command's stdout and stderr": screened.output}
    found.update(every_file(screened.results))
    found.update(every_file(screened.prefect_home))
    assert any(name.endswith(".db") for name in found), "no Prefect database found under PREFECT_HOME"
    return found


def test_the_identifiers_are_there_to_be_found(screened):
    """The search finds every identifier in the inputs, and each kind of input got its row."""
    assert len(leaks(HEADER_TAGS, every_file(screened.incoming))) == 4 * len(HEADER_TAGS)
    assert {name: row["status"] for name, row in screened.rows.items()} == {
        "a.dcm": "ok", "IM0002": "ok", "c.dcm": "rejected", "d.dcm": "rejected", "e.dcm": "ok"}
    assert "pixel data" in screened.rows["c.dcm"]["reason"]


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
    reasons = {name: (row["status"], row["reason"]) for name, row in screened.rows.items()}
    assert all(status == "rejected" for status, _ in reasons.values()) and len(reasons) == len(files), (
        reasons, screened.output.decode(errors="replace")[-3000:])
    assert leaks(names, places(screened)) == []
