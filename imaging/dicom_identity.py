"""Which DICOM study a row belongs to, so that a flag can be found in PACS, and how it was acquired.

A row carries the study, series and instance UIDs, the accession number and the view position of a
DICOM input (empty for other inputs), and the header fields a site's drift is watched on (Modality,
Manufacturer, PhotometricInterpretation, a pixel spacing bin: screening/drift.py), never a
patient's name, id or birth date. Every value is
checked against a narrow grammar wherever it crosses a boundary (read from a header, sent back by a
decoder worker, read back from storage): a UID is digits and dots, an accession number a short
alphanumeric code, a view position, modality, manufacturer, photometric interpretation or pixel
spacing one of our own words. Anything else becomes empty rather than
being quoted, since header text can hold anything, a name included.

With ``deidentify``, the UIDs and the accession number are replaced with keyed hashes
(HMAC-SHA256 under ``CXR_DEIDENTIFY_KEY``): the same study always gets the same token at a site
that keeps its key, and only that site can compute a token from a study it holds.

Free of pydicom: the parent process, the results and the report use this module; reading a header
is ``imaging.dicom_guard``'s work, in a decoder worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Any

from imaging.limits import ImageDecodeError

__all__ = [
    "ACQUISITION_FIELDS",
    "DEIDENTIFY_KEY_VARIABLE",
    "IDENTITY_FIELDS",
    "MANUFACTURERS",
    "MODALITY_TERMS",
    "NON_STANDARD",
    "NOT_FRONTAL_CHEST",
    "PHOTOMETRIC_TERMS",
    "PIXEL_SPACING_BINS",
    "VIEW_TERMS",
    "DeidentifyKeyMissing",
    "DicomRejected",
    "Study",
    "deidentify_key",
    "is_accession_number",
    "is_study_field",
    "is_uid",
    "is_view_position",
    "manufacturer_name",
    "pixel_spacing_bin",
]

DEIDENTIFY_KEY_VARIABLE = "CXR_DEIDENTIFY_KEY"
_MIN_KEY_CHARACTERS = 16

# ViewPosition words we recognise, with the kind of view each names: the DX and CR defined terms
# (PS3.3 C.8.11.5.1.1) and the vendor words seen in the wild. A row's view_position is one of these,
# "other" (present, none of these) or empty (absent).
VIEW_TERMS = {
    "AP": "frontal", "PA": "frontal", "FRONTAL": "frontal",
    "LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral",
    "RLO": "oblique", "LLO": "oblique", "OBL": "oblique", "OBLIQUE": "oblique",
    "RLD": "decubitus", "LLD": "decubitus", "DECUB": "decubitus", "DECUBITUS": "decubitus",
}  # fmt: skip
OTHER_VIEW = "other"

# A UID (PS3.5 9.1): an OID under the root arc 0, 1 or 2, no component with a leading zero, 64
# characters at most. So a date or a bare number (a birth date, a patient id) is not taken for one.
_UID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# An accession number (SH, 16 characters at most): letters and digits, some separators inside. It
# starts with a letter or digit, so that no spreadsheet takes it for a formula.
_ACCESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,15}")


def is_uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def is_accession_number(value: Any) -> bool:
    return isinstance(value, str) and _ACCESSION.fullmatch(value) is not None


def is_view_position(value: Any) -> bool:
    return value in VIEW_TERMS or value == OTHER_VIEW


# Modality defined terms (PS3.3 C.7.3.1.1.1); any other value is "non-standard".
MODALITY_TERMS = frozenset({
    "AR", "AU", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DOC", "DR", "DX", "ECG", "EPS", "ES", "GM", "HC", "HD", "IO",
    "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPV", "OSS",
    "OT", "PLAN", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTPLAN", "RTRECORD", "RTSTRUCT",
    "SC", "SEG", "SM", "SMR", "SR", "SRF", "TG", "US", "VA", "XA", "XC",
})  # fmt: skip
NON_STANDARD = "non-standard"
NOT_FRONTAL_CHEST = "not a frontal chest X-ray"  # how the DICOM guard's reasons begin
# Makers of radiography systems, as a row names them; a Manufacturer whose first word is none of
# these is "other" (the element is free text, and free text may hold a name).
MANUFACTURERS = {
    "AGFA": "Agfa", "CANON": "Canon", "CARESTREAM": "Carestream", "KODAK": "Carestream", "DRGEM": "DRGEM",
    "FUJI": "Fujifilm", "FUJIFILM": "Fujifilm", "GE": "GE", "HOLOGIC": "Hologic", "KONICA": "Konica Minolta",
    "PHILIPS": "Philips", "RAYENCE": "Rayence", "SAMSUNG": "Samsung", "SHIMADZU": "Shimadzu", "SIEMENS": "Siemens",
    "TOSHIBA": "Canon", "VIEWORKS": "Vieworks", "VARIAN": "Varian", "VAREX": "Varex", "ICRCO": "iCRco",
    "SWISSRAY": "Swissray", "HITACHI": "Hitachi", "MINDRAY": "Mindray", "PLANMED": "Planmed", "ANALOGIC": "Analogic",
}  # fmt: skip
OTHER_MANUFACTURER = "other"
PHOTOMETRIC_TERMS = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                               "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
# Bins of the first PixelSpacing (or ImagerPixelSpacing) value, in mm: detectors differ by these.
PIXEL_SPACING_BINS = ("< 0.10 mm", "0.10-0.15 mm", "0.15-0.20 mm", "0.20-0.30 mm", ">= 0.30 mm")
_SPACING_EDGES = (0.10, 0.15, 0.20, 0.30)


def pixel_spacing_bin(millimetres: float) -> str:
    """The bin of a pixel spacing in mm (finite, > 0); "" for anything else."""
    if not (isinstance(millimetres, (int, float)) and 0 < millimetres < 100):
        return ""
    return PIXEL_SPACING_BINS[sum(millimetres >= edge for edge in _SPACING_EDGES)]


def manufacturer_name(text: str) -> str:
    """A Manufacturer element's value as a row names it: a maker of MANUFACTURERS by its first word, else "other"."""
    words = re.findall(r"[A-Z]+", text.upper())
    return MANUFACTURERS.get(words[0], OTHER_MANUFACTURER) if words else OTHER_MANUFACTURER


_UID_FIELDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
ACQUISITION_FIELDS = ("modality", "manufacturer", "photometric_interpretation", "pixel_spacing")
IDENTITY_FIELDS = (*_UID_FIELDS, "accession_number", "view_position", *ACQUISITION_FIELDS)
_CHECKS = {**dict.fromkeys(_UID_FIELDS, is_uid), "accession_number": is_accession_number,
           "view_position": is_view_position,
           "modality": lambda value: value in MODALITY_TERMS or value == NON_STANDARD,
           "manufacturer": lambda value: value in MANUFACTURERS.values() or value == OTHER_MANUFACTURER,
           "photometric_interpretation": lambda value: value in PHOTOMETRIC_TERMS or value == NON_STANDARD,
           "pixel_spacing": lambda value: value in PIXEL_SPACING_BINS}


def is_study_field(name: str, value: Any) -> bool:
    """``value`` is what a row may hold in the study field ``name``: empty, or a value of its grammar."""
    return value == "" or (isinstance(value, str) and _CHECKS[name](value))


@dataclass(frozen=True)
class Study:
    """A DICOM input's place in PACS and how it was acquired; each value checked, empty when absent or unusable."""

    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    accession_number: str = ""
    view_position: str = ""  # a word of VIEW_TERMS, "other", or empty
    # How it was acquired (drift is watched on these), each a word of its vocabulary above, or empty.
    modality: str = ""
    manufacturer: str = ""
    photometric_interpretation: str = ""
    pixel_spacing: str = ""  # a bin of PIXEL_SPACING_BINS

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            value = getattr(self, name)
            if value != "" and not check(value):
                raise ValueError(f"{name} is not {'a ' + name.replace('_', ' ')} this code writes")

    def to_record(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> Study | None:
        """What a decoder worker sent back: None, or exactly these fields, each checked (ValueError)."""
        if record is None:
            return None
        if not isinstance(record, dict) or set(record) != set(IDENTITY_FIELDS):
            raise ValueError("a study record holds exactly " + ", ".join(IDENTITY_FIELDS))
        if not all(isinstance(value, str) for value in record.values()):
            raise ValueError("a study record holds strings")
        return cls(**record)

    def deidentified(self, key: bytes) -> Study:
        """The UIDs and the accession number as keyed hashes: a UID becomes a UID under the 2.25 root
        (a 128-bit number, as for UUID-derived UIDs), an accession number 16 hexadecimal digits."""

        def token(value: str) -> bytes:
            return hmac.new(key, value.encode("ascii"), hashlib.sha256).digest()

        hashed = {}
        for name in _UID_FIELDS:
            if getattr(self, name):
                hashed[name] = f"2.25.{int.from_bytes(token(getattr(self, name))[:16], 'big')}"
        if self.accession_number:
            hashed["accession_number"] = token(self.accession_number).hex()[:16]
        return dataclasses.replace(self, **hashed)


class DicomRejected(ImageDecodeError):
    """A DICOM input refused after its header was read: the rejected row can still say which study."""

    def __init__(self, uri: str, reason: str, study: Study) -> None:
        super().__init__(uri, reason)
        self.study = study


class DeidentifyKeyMissing(ValueError):
    """De-identification asked for without a usable key: nothing may be screened."""


def deidentify_key() -> bytes:
    """The site's de-identification key from ``CXR_DEIDENTIFY_KEY``; raises ``DeidentifyKeyMissing``
    when it is unset or too short to keep tokens from being guessed."""
    key = os.environ.get(DEIDENTIFY_KEY_VARIABLE, "")
    if len(key) < _MIN_KEY_CHARACTERS:
        state = "is not set" if not key else f"holds fewer than {_MIN_KEY_CHARACTERS} characters"
        raise DeidentifyKeyMissing(
            f"de-identification needs a key, and {DEIDENTIFY_KEY_VARIABLE} {state}: set it to a secret of at least "
            f"{_MIN_KEY_CHARACTERS} characters, the same at every run of a site (so a study keeps its token), "
            "wherever screening runs (every Dask worker too)"
        )
    return key.encode("utf-8", "surrogateescape")
