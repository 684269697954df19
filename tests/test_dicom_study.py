"""A DICOM input's place in PACS on its row, the view guard, and de-identification.

Headers written by pydicom in the test (``tests/dicom_builder.radiograph``): the study identifiers
read and checked, a lateral view and a CT refused with their reasons (and still named by study),
header text never quoted, and keyed hashes in place of the identifiers when asked, in the parent,
through the real decoder workers.
"""

from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset

from imaging.decode import ImageDecodeError, decode_image_and_study
from imaging.dicom_identity import DeidentifyKeyMissing, DicomRejected, Study, deidentify_key
from model.preprocessing import Preprocessing
from store import storage
from store.loading import InputLimits, load_image
from tests.dicom_builder import PATIENT_NAME, dicom_bytes, radiograph, ramp
from tests.hostile_files import encode, gradient

STUDY_UID, SERIES_UID = "1.2.840.113619.2.55.3.604688119", "1.2.840.113619.2.55.3.604688119.1"
KEY = "a site's secret key, kept by the site"


def chest(**header: object) -> Dataset:
    """A frontal chest radiograph with its study identifiers; ``header`` sets or (None) removes elements."""
    return radiograph(**{"StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID, "AccessionNumber": "ACC0042",
                         "ViewPosition": "PA", "BodyPartExamined": "CHEST", **header})


def decoded(dataset: Dataset, frontal_chest_only: bool = True) -> Study | None:
    return decode_image_and_study(dicom_bytes(dataset), "x.dcm", frontal_chest_only=frontal_chest_only)[1]


def refused(dataset: Dataset) -> DicomRejected:
    with pytest.raises(DicomRejected) as caught:
        decode_image_and_study(dicom_bytes(dataset), "x.dcm", frontal_chest_only=True)
    return caught.value


def test_a_dicom_row_knows_its_study_and_other_formats_have_none():
    study = decoded(chest())
    assert study == Study(STUDY_UID, SERIES_UID, study.sop_instance_uid, "ACC0042", "PA", modality="DX",
                          photometric_interpretation="MONOCHROME2")
    assert re.fullmatch(r"[0-9.]+", study.sop_instance_uid)
    assert decode_image_and_study(encode(gradient(), ".png"), "x.png", frontal_chest_only=True)[1] is None


@pytest.mark.parametrize("header, reason", [
    ({"ViewPosition": "LL"}, "not a frontal chest X-ray: lateral view (DICOM ViewPosition LL)"),
    ({"ViewPosition": "RL"}, "not a frontal chest X-ray: lateral view (DICOM ViewPosition RL)"),
    ({"ViewPosition": "LATERAL"}, "not a frontal chest X-ray: lateral view (DICOM ViewPosition LATERAL)"),
    ({"ViewPosition": "AP LATERAL"}, "not a frontal chest X-ray: lateral view (DICOM ViewPosition LATERAL)"),
    ({"ViewPosition": "RLO"}, "not a frontal chest X-ray: oblique view (DICOM ViewPosition RLO)"),
    ({"ViewPosition": "LLD"}, "not a frontal chest X-ray: decubitus view (DICOM ViewPosition LLD)"),
    ({"Modality": "CT"}, "not a frontal chest X-ray: DICOM Modality CT, not CR, DX or DR"),
    ({"Modality": "US"}, "not a frontal chest X-ray: DICOM Modality US, not CR, DX or DR"),
    ({"BodyPartExamined": "SKULL"}, "not a frontal chest X-ray: DICOM BodyPartExamined SKULL"),
    ({"BodyPartExamined": "KNEE", "ViewPosition": "LL"}, "not a frontal chest X-ray: DICOM BodyPartExamined KNEE"),
])
def test_a_lateral_view_or_another_modality_or_body_part_is_rejected_with_its_reason(header, reason):
    error = refused(chest(**header))
    assert error.reason == reason
    assert error.study.study_instance_uid == STUDY_UID and error.study.accession_number == "ACC0042"
    assert decoded(chest(**header), frontal_chest_only=False).study_instance_uid == STUDY_UID  # switched off


@pytest.mark.parametrize("header, view", [
    ({"Modality": "CR"}, "PA"), ({"Modality": "DR"}, "PA"), ({"Modality": None}, "PA"),
    ({"BodyPartExamined": None}, "PA"), ({"BodyPartExamined": "THORAX"}, "PA"),
    ({"BodyPartExamined": "CHEST_LUNG"}, "PA"),
    ({"ViewPosition": None}, ""), ({"ViewPosition": "AP"}, "AP"), ({"ViewPosition": "AP SUPINE"}, "AP"),
    ({"ViewPosition": "XYZZY"}, "other"),
])
def test_frontal_chest_radiographs_and_headers_that_do_not_say_pass(header, view):
    study = decoded(chest(**header))
    assert study.study_instance_uid == STUDY_UID and study.view_position == view


def test_the_guard_runs_before_the_pixels_a_ct_volume_is_named_as_a_ct_not_as_multi_frame():
    import numpy as np

    volume = radiograph(np.stack([ramp(0, 4000)] * 3))
    volume.Modality = "CT"
    assert refused(volume).reason == "not a frontal chest X-ray: DICOM Modality CT, not CR, DX or DR"


def test_header_text_is_never_quoted_in_a_reason_or_a_field():
    for keyword in ("Modality", "BodyPartExamined"):
        error = refused(chest(**{keyword: PATIENT_NAME}))
        assert error.reason.endswith(f"DICOM {keyword} (non-standard value)" + (
            ", not CR, DX or DR" if keyword == "Modality" else ""))
    error = refused(chest(Modality=["DX", "CT"]))
    assert error.reason == "not a frontal chest X-ray: DICOM Modality (non-standard value), not CR, DX or DR"
    hostile = chest(ViewPosition=PATIENT_NAME, AccessionNumber=PATIENT_NAME[:16], StudyInstanceUID="1.2.DOE",
                    SeriesInstanceUID="1.2." + "3" * 70, Manufacturer=PATIENT_NAME)
    study = decoded(hostile)
    assert study == Study("", "", study.sop_instance_uid, "", "other", modality="DX", manufacturer="other",
                          photometric_interpretation="MONOCHROME2")
    for part in PATIENT_NAME.split("^"):
        assert part not in repr(study)


@pytest.mark.parametrize("header, expected", [
    ({"Manufacturer": "SIEMENS Healthineers", "PixelSpacing": [0.143, 0.143]},
     {"manufacturer": "Siemens", "pixel_spacing": "0.10-0.15 mm"}),
    ({"Manufacturer": "Carestream Health", "ImagerPixelSpacing": [0.168, 0.168]},
     {"manufacturer": "Carestream", "pixel_spacing": "0.15-0.20 mm"}),
    ({"Manufacturer": "Acme Imaging", "PixelSpacing": [0.35, 0.35]}, {"manufacturer": "other", "pixel_spacing": ">= 0.30 mm"}),
    ({"Manufacturer": None, "PixelSpacing": b"abc\\def"}, {"manufacturer": "", "pixel_spacing": ""}),
    ({"PixelSpacing": [0.0, 0.0]}, {"pixel_spacing": ""}),
    ({"Modality": "CR"}, {"modality": "CR"}),
    ({"Modality": "XYZ"}, {"modality": "non-standard"}),
])
def test_how_it_was_acquired_is_named_by_our_words(header, expected):
    """The header fields drift is watched on: a maker by its first word, pixel spacing in bins, anything
    else "other", "non-standard" or empty; never the header's own text."""
    study = decoded(chest(**header), frontal_chest_only=False)
    assert {name: getattr(study, name) for name in expected} == expected


def test_a_rejection_before_the_header_is_read_names_no_study_and_one_after_it_does():
    data = dicom_bytes(chest())
    with pytest.raises(ImageDecodeError) as caught:
        decode_image_and_study(data[:100] + b"DICM" + bytes(50), "cut.dcm", frontal_chest_only=True)
    assert not isinstance(caught.value, DicomRejected)
    broken = chest()
    broken.BitsAllocated = 7
    assert refused(broken).reason.startswith("unsupported DICOM BitsAllocated 7")


# --- the identifiers crossing boundaries ---------------------------------------------------------


def test_a_study_holds_only_values_that_fit_their_grammar():
    for field, value in [("study_instance_uid", "1.2.abc"), ("study_instance_uid", "19330517"),  # a birth date
                         ("study_instance_uid", "17.05.1921"), ("sop_instance_uid", "1.2." + "3" * 61),
                         ("accession_number", "DOE^JANE"),
                         ("accession_number", "-1+1"), ("view_position", "Zorblattnik"),
                         ("manufacturer", "DOE^JANE"), ("modality", "ct"), ("pixel_spacing", "0.1"),
                         ("photometric_interpretation", "JOHN")]:
        with pytest.raises(ValueError, match=field):
            Study(**{field: value})
    good = Study(STUDY_UID, SERIES_UID, "1.2.3", "ACC0042", "LL")
    assert Study.from_record(good.to_record()) == good and Study.from_record(None) is None
    for forged in [{**good.to_record(), "patient_name": "x"}, {**good.to_record(), "view_position": 3}, ["x"]]:
        with pytest.raises(ValueError):
            Study.from_record(forged)


def test_deidentified_identifiers_are_stable_keyed_tokens_not_the_raw_values():
    study = Study(STUDY_UID, SERIES_UID, "1.2.3", "ACC0042", "PA")
    once, again = study.deidentified(KEY.encode()), study.deidentified(KEY.encode())
    other_site = study.deidentified(b"another site's key, kept elsewhere")
    assert once == again and once != other_site
    assert once.view_position == "PA"  # not an identifier
    for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        token = getattr(once, name)
        assert token != getattr(study, name) and re.fullmatch(r"2\.25\.[0-9]{1,39}", token)
    assert re.fullmatch(r"[0-9a-f]{16}", once.accession_number) and once.accession_number != "ACC0042"
    assert Study.from_record(once.to_record()) == once  # a token fits the grammar it replaces
    assert Study(accession_number="ACC0042").deidentified(KEY.encode()).study_instance_uid == ""


def test_deidentification_without_a_key_refuses_to_start(monkeypatch):
    monkeypatch.delenv("CXR_DEIDENTIFY_KEY", raising=False)
    with pytest.raises(DeidentifyKeyMissing, match="CXR_DEIDENTIFY_KEY is not set"):
        deidentify_key()
    monkeypatch.setenv("CXR_DEIDENTIFY_KEY", "short")
    with pytest.raises(DeidentifyKeyMissing, match="fewer than 16 characters"):
        deidentify_key()
    monkeypatch.setenv("CXR_DEIDENTIFY_KEY", KEY)
    assert deidentify_key() == KEY.encode()


# --- through the decoder workers -----------------------------------------------------------------


def test_loading_through_a_worker_rejects_a_lateral_view_and_deidentifies_in_the_parent(tmp_path, monkeypatch):
    spec = Preprocessing(input_size=32)
    frontal, lateral = str(tmp_path / "frontal.dcm"), str(tmp_path / "lateral.dcm")
    storage.write_bytes(frontal, dicom_bytes(chest()))
    storage.write_bytes(lateral, dicom_bytes(chest(ViewPosition="LL")))

    loaded = load_image(frontal, spec)
    assert loaded.pixels is not None and loaded.study.study_instance_uid == STUDY_UID
    assert loaded.study.accession_number == "ACC0042" and loaded.study.view_position == "PA"
    rejected = load_image(lateral, spec)
    assert rejected.pixels is None
    assert rejected.reason == "not a frontal chest X-ray: lateral view (DICOM ViewPosition LL)"
    assert rejected.study.study_instance_uid == STUDY_UID and rejected.study.view_position == "LL"
    assert load_image(lateral, spec, InputLimits(frontal_chest_only=False)).pixels is not None

    monkeypatch.delenv("CXR_DEIDENTIFY_KEY", raising=False)
    with pytest.raises(DeidentifyKeyMissing):
        load_image(frontal, spec, InputLimits(deidentify=True))
    monkeypatch.setenv("CXR_DEIDENTIFY_KEY", KEY)
    hidden = load_image(frontal, spec, InputLimits(deidentify=True))
    assert hidden.study == loaded.study.deidentified(KEY.encode())
    assert STUDY_UID not in repr(hidden) and "ACC0042" not in repr(hidden)
    assert load_image(lateral, spec, InputLimits(deidentify=True)).study.study_instance_uid == \
        hidden.study.study_instance_uid  # the same study, the same token
