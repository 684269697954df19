"""What a DICOM header says about the study: where PACS keeps it, and whether it is a frontal chest X-ray.

Runs in a decoder worker (``imaging.dicom``) on an untrusted header. Identifiers are kept only when
they fit their grammar (``imaging.dicom_identity``), and a reason names only words of our own: a
Modality, BodyPartExamined or ViewPosition that is not one of the fixed terms below is called a
"non-standard value", never quoted, since any string element can carry a patient's name.

The guard rejects what the header says is something else: a Modality other than CR, DX or DR (a CT,
an ultrasound, a secondary capture), a BodyPartExamined other than the chest, a lateral, oblique or
decubitus ViewPosition. An element that is absent does not reject: many radiographs lack them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydicom.dataset import Dataset

from imaging.dicom_fields import field_value, is_multi
from imaging.dicom_identity import (
    MODALITY_TERMS,
    NON_STANDARD,
    NOT_FRONTAL_CHEST,
    OTHER_VIEW,
    PHOTOMETRIC_TERMS,
    VIEW_TERMS,
    Study,
    is_accession_number,
    is_uid,
    manufacturer_name,
    pixel_spacing_bin,
)
from imaging.limits import ImageDecodeError

__all__ = ["NOT_FRONTAL_CHEST", "SCREENED_MODALITIES", "check_frontal_chest", "read_study"]

SCREENED_MODALITIES = ("CR", "DX", "DR")
# Modality defined terms (PS3.3 C.7.3.1.1.1) a reason may name; any other value is "non-standard".
_NAMED_MODALITIES = MODALITY_TERMS
_CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
# Body parts (PS3.16 Annex L, and common vendor words) a reason may name.
_NAMED_BODY_PARTS = frozenset({
    "ABDOMEN", "ANKLE", "ARM", "BRAIN", "BREAST", "CLAVICLE", "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FACE",
    "FEMUR", "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HEART", "HEEL", "HIP", "HUMERUS", "JAW", "KNEE", "LEG",
    "LSPINE", "NECK", "ORBIT", "PATELLA", "PELVIS", "RIB", "RIBS", "SACRUM", "SCAPULA", "SHOULDER", "SINUS", "SKULL",
    "SPINE", "SSPINE", "STERNUM", "TIBIA", "TMJ", "TOE", "TSPINE", "WHOLEBODY", "WRIST",
})  # fmt: skip
_WORDS = re.compile(r"[A-Z]+")
# Several values, or a value that is not text: fits no grammar and names no term.
_UNUSABLE = "\\"


def read_study(dataset: Dataset, uri: str) -> Study:
    """The study's identifiers, view position and acquisition fields; whatever is unreadable or does
    not fit is empty, and a value outside a field's vocabulary is named by a word of ours."""
    return Study(
        study_instance_uid=_identifier(dataset, "StudyInstanceUID", uri, is_uid),
        series_instance_uid=_identifier(dataset, "SeriesInstanceUID", uri, is_uid),
        sop_instance_uid=_identifier(dataset, "SOPInstanceUID", uri, is_uid),
        accession_number=_identifier(dataset, "AccessionNumber", uri, is_accession_number),
        view_position=_readable_view(dataset, uri),
        modality=_term(dataset, "Modality", uri, lambda text: text.upper() if text.upper() in MODALITY_TERMS
                       else NON_STANDARD),
        manufacturer=_term(dataset, "Manufacturer", uri, manufacturer_name),
        photometric_interpretation=_term(dataset, "PhotometricInterpretation", uri,
                                         lambda text: text.upper() if text.upper() in PHOTOMETRIC_TERMS else NON_STANDARD),
        pixel_spacing=_spacing(dataset, uri),
    )


def _term(dataset: Dataset, keyword: str, uri: str, named: Callable[[str], str]) -> str:
    """A text element as a word of ours (``named``); empty when absent, unreadable or of several values."""
    try:
        text = _text(dataset, keyword, uri)
    except ImageDecodeError:
        return ""
    return "" if text is None or text == _UNUSABLE else named(text)


def _spacing(dataset: Dataset, uri: str) -> str:
    """The bin of the row spacing of PixelSpacing, else ImagerPixelSpacing; empty when neither is usable."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = field_value(dataset, keyword, uri)
            first = value[0] if is_multi(value) and len(value) else value
            found = pixel_spacing_bin(float(first)) if first is not None else ""
        except (ImageDecodeError, TypeError, ValueError, OverflowError):
            found = ""
        if found:
            return found
    return ""


def check_frontal_chest(dataset: Dataset, uri: str) -> None:
    """Raises ``ImageDecodeError`` for a study its header says is not a frontal chest X-ray."""
    modality = _text(dataset, "Modality", uri)
    if modality is not None and modality.upper() not in SCREENED_MODALITIES:
        raise ImageDecodeError(
            uri, f"{NOT_FRONTAL_CHEST}: DICOM Modality {_named(modality, _NAMED_MODALITIES)}, not CR, DX or DR"
        )
    body_part = _text(dataset, "BodyPartExamined", uri)
    if body_part is not None and not _is_chest(body_part.upper()):
        named = _named(body_part, _NAMED_BODY_PARTS)
        raise ImageDecodeError(uri, f"{NOT_FRONTAL_CHEST}: DICOM BodyPartExamined {named}")
    view, kind = _view(_text(dataset, "ViewPosition", uri))
    if kind is not None and kind != "frontal":
        raise ImageDecodeError(uri, f"{NOT_FRONTAL_CHEST}: {kind} view (DICOM ViewPosition {view})")


def _text(dataset: Dataset, keyword: str, uri: str) -> str | None:
    """The element's text, stripped; None when absent or empty; raises ``ImageDecodeError`` when unreadable."""
    value = field_value(dataset, keyword, uri)
    if value is None:
        return None
    if isinstance(value, str) and not is_multi(value):
        return value.strip() or None
    return _UNUSABLE


def _identifier(dataset: Dataset, keyword: str, uri: str, fits: Callable[[str], bool]) -> str:
    try:
        text = _text(dataset, keyword, uri)
    except ImageDecodeError:
        return ""  # an identifier is shown where it can be; its absence rejects nothing
    return str(text) if text is not None and fits(text) else ""


def _readable_view(dataset: Dataset, uri: str) -> str:
    try:
        return _view(_text(dataset, "ViewPosition", uri))[0]
    except ImageDecodeError:
        return ""


def _view(text: str | None) -> tuple[str, str | None]:
    """A ViewPosition as the row shows it (a term of ours, "other" or empty) and the kind of view it
    names (None when it names none). A value of several words is read by its words: a non-frontal
    one wins, so "AP LATERAL" is lateral."""
    if text is None:
        return "", None
    upper = text.upper()
    if upper in VIEW_TERMS:
        return upper, VIEW_TERMS[upper]
    words = [word for word in _WORDS.findall(upper) if word in VIEW_TERMS]
    for kind in ("decubitus", "oblique", "lateral", "frontal"):
        for word in words:
            if VIEW_TERMS[word] == kind:
                return word, kind
    return OTHER_VIEW, None


def _is_chest(body_part: str) -> bool:
    return body_part.startswith("CHEST") or not _CHEST_WORDS.isdisjoint(_WORDS.findall(body_part))


def _named(text: str, terms: frozenset[str]) -> str:
    return text.upper() if text.upper() in terms else "(non-standard value)"
