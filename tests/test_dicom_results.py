"""The DICOM objects screening gives back to a PACS (screening/dicom_results.py): a TID 1500
Comprehensive SR per screened image and a "not for diagnosis" Secondary Capture of the heat map,
checked by reading them back with highdicom and by dciodvfy (Debian's dicom3tools)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from screening.dicom_results import (
    NOT_FOR_DIAGNOSIS,
    Screening,
    derived_uid,
    heat_map_capture,
    read_report,
    structured_report,
)
from tests.dicom_builder import PATIENT_NAME, radiograph

PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                     "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def source_image(**header):
    """A frontal chest radiograph with its patient and study modules; ``header`` overrides (None: left out)."""
    return radiograph(**{"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "PatientID": "P-0042",
                         "PatientBirthDate": "19610304", "PatientSex": "F", "StudyDate": "20261205",
                         "StudyTime": "021500", "StudyID": "S1", "AccessionNumber": "ACC-991",
                         "ReferringPhysicianName": "SMITH^A", "SeriesNumber": 1, "InstanceNumber": 1,
                         "PatientOrientation": ["L", "F"], "ViewPosition": "PA", **header})


def dciodvfy_errors(dataset, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian's dicom3tools: apt-get install dicom3tools)")
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("probability, present", [(0.83, True), (0.12, False)])
def test_the_report_states_the_finding_at_the_threshold_and_files_under_the_source_study(tmp_path, probability,
                                                                                         present):
    source = source_image()
    report = structured_report(source, Screening("covid", probability, 0.5, "v20261201-ab12"))
    assert dciodvfy_errors(report, tmp_path) == []
    assert read_report(dcmread(tmp_path / f"{report.SOPInstanceUID}.dcm")) == {
        "finding": "COVID-19", "present": present, "probability": probability, "threshold": 0.5,
        "model_version": "v20261201-ab12", "source_sop_instance_uid": source.SOPInstanceUID}
    assert {keyword: str(report.get(keyword)) for keyword in PATIENT_AND_STUDY} == \
        {keyword: str(source.get(keyword)) for keyword in PATIENT_AND_STUDY}
    assert str(report.PatientName) == PATIENT_NAME and report.Modality == "SR"
    assert report.CompletionFlag == "COMPLETE" and report.VerificationFlag == "UNVERIFIED"  # nobody signed it
    assert report.ContributingEquipmentSequence[0].SoftwareVersions == "v20261201-ab12"
    assert report.SeriesInstanceUID != source.SeriesInstanceUID


def test_other_findings_and_a_source_missing_type_2_attributes(tmp_path):
    source = source_image(PatientBirthDate=None, StudyID=None, ReferringPhysicianName=None)
    report = structured_report(source, Screening("viral", 0.7, 0.4, "v2"))
    assert dciodvfy_errors(report, tmp_path) == []
    assert read_report(report)["finding"] == "Viral pneumonia" and report.PatientBirthDate == ""
    with pytest.raises(ValueError, match="no coded finding for class 'normal'"):
        structured_report(source, Screening("normal", 0.7, 0.4, "v2"))


def test_uids_follow_the_source_and_the_model_version_only():
    source = source_image()
    first, again = (structured_report(source, Screening("covid", p, 0.5, "v1")) for p in (0.9, 0.8))
    newer = structured_report(source, Screening("covid", 0.9, 0.5, "v2"))
    assert first.SOPInstanceUID == again.SOPInstanceUID  # a rerun re-sends the same object
    assert newer.SOPInstanceUID != first.SOPInstanceUID and newer.SeriesInstanceUID != first.SeriesInstanceUID
    other_image = source_image(StudyInstanceUID=source.StudyInstanceUID)
    assert structured_report(other_image, Screening("covid", 0.9, 0.5, "v1")).SeriesInstanceUID == first.SeriesInstanceUID
    for root in ("2.25", "1.2.826.0.1.3680043.10.1234"):
        uid = derived_uid(root, source.SOPInstanceUID, "v1", "report")
        assert len(uid) <= 64 and uid.startswith(root + ".") and re.fullmatch(r"[0-9]+(\.(0|[1-9][0-9]*))+", uid)
    assert int(derived_uid("2.25", "x").split(".")[2]) < 2**128
    with pytest.raises(ValueError, match="UID root"):
        derived_uid("1.02.3", "x")


def test_the_heat_map_is_a_secondary_capture_marked_not_for_diagnosis(tmp_path):
    source = source_image()
    overlay = np.full((256, 256, 3), (200, 40, 40), np.uint8)
    capture = heat_map_capture(source, overlay, Screening("covid", 0.91, 0.5, "v1"))
    assert dciodvfy_errors(capture, tmp_path) == []
    assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and capture.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in capture.SeriesDescription and NOT_FOR_DIAGNOSIS in capture.ImageComments
    assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.AccessionNumber == source.AccessionNumber
    pixels = capture.pixel_array
    assert pixels.shape == overlay.shape
    assert (pixels[:40, :200] != overlay[:40, :200]).any(), "the label is not burnt in"
    assert (pixels[100:] == overlay[100:]).all(), "the map itself changed"
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        heat_map_capture(source, overlay[..., 0], Screening("covid", 0.91, 0.5, "v1"))
