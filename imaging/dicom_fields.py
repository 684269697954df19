"""DICOM header values read as untrusted input: typed, range-checked, never quoted.

pydicom converts values lazily, so reading one can raise. Each value used is checked for type and
range before any pixel is allocated, and a reason never quotes header text (any string element can
carry a patient's name), only numbers we parsed and names of our own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from imaging.limits import DECODER_FAILURES, ImageDecodeError, error_kind

__all__ = ["COLOUR", "DICOM_FAILURES", "PALETTE", "Layout", "field_numbers", "field_value", "is_multi", "read_layout"]

# pydicom's own exceptions derive from Exception alone; its messages quote element values.
DICOM_FAILURES = (*DECODER_FAILURES, BytesLengthException, InvalidDicomError)
_GRAY = {"MONOCHROME1", "MONOCHROME2"}
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422"}
PALETTE = "PALETTE COLOR"
# Defined terms of PS3.3 C.7.6.3.1.2 that we do not decode: fixed words, safe to name in a reason.
_STANDARD_UNSUPPORTED = {"YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYB"}


@dataclass(frozen=True)
class Layout:
    """The layout of a single-frame image as its header states it, each value checked."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    photometric: str
    frames_stated: bool  # NumberOfFrames present (and 1) rather than absent


def field_value(dataset: Dataset, keyword: str, uri: str) -> object | None:
    """An element's value, None when absent or empty; values are converted lazily, so this raises."""
    try:
        value = dataset.get(keyword)
    except DICOM_FAILURES as error:
        raise ImageDecodeError(uri, f"unreadable DICOM {keyword} ({error_kind(error)})") from None
    return None if value is None or (isinstance(value, (str, bytes)) and not value) else value


def _integer(dataset: Dataset, keyword: str, uri: str, default: int | None = None) -> int:
    value = field_value(dataset, keyword, uri)
    if value is None:
        if default is None:
            raise ImageDecodeError(uri, f"missing DICOM {keyword}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):  # IS "abc" stays a str
        raise ImageDecodeError(uri, f"invalid DICOM {keyword}: {_not_one(value, 'an integer')}")
    return int(value)


def field_numbers(dataset: Dataset, keyword: str, uri: str, single: bool = False) -> list[float]:
    """The finite numbers of a DS element (empty when absent)."""
    value = field_value(dataset, keyword, uri)
    if value is None:
        return []
    values = list(value) if is_multi(value) and not single else [value]
    for number in values:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ImageDecodeError(uri, f"invalid DICOM {keyword}: {_not_one(number, 'a number')}")
        if not math.isfinite(number):
            raise ImageDecodeError(uri, f"invalid DICOM {keyword}: not a finite number")
    return [float(number) for number in values]


def is_multi(value: object) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def _not_one(value: object, what: str) -> str:
    return "several values where one is expected" if is_multi(value) else f"not {what}"


def read_layout(dataset: Dataset, uri: str) -> Layout:
    """The image layout its header states, each value checked (one frame, 8 or 16 bits, samples that fit)."""
    frames = _integer(dataset, "NumberOfFrames", uri, default=1)
    if frames < 1:
        raise ImageDecodeError(uri, f"invalid DICOM NumberOfFrames {frames} (must be at least 1)")
    if frames > 1:
        raise ImageDecodeError(uri, f"multi-frame DICOM ({frames} frames) is not supported: expected one radiograph")
    photometric = _photometric(dataset, uri)
    samples = _integer(dataset, "SamplesPerPixel", uri)
    if samples not in (1, 3):
        raise ImageDecodeError(uri, f"unsupported DICOM SamplesPerPixel {samples} (expected 1 or 3)")
    if samples != (3 if photometric in COLOUR else 1):
        raise ImageDecodeError(uri, f"DICOM SamplesPerPixel {samples} does not fit {photometric}")
    bits_allocated = _integer(dataset, "BitsAllocated", uri)
    if bits_allocated not in (8, 16):
        raise ImageDecodeError(uri, f"unsupported DICOM BitsAllocated {bits_allocated} (expected 8 or 16)")
    bits_stored = _integer(dataset, "BitsStored", uri)
    if not 1 <= bits_stored <= bits_allocated:
        raise ImageDecodeError(uri, f"invalid DICOM BitsStored {bits_stored} for BitsAllocated {bits_allocated}")
    if _integer(dataset, "PixelRepresentation", uri) not in (0, 1):
        raise ImageDecodeError(uri, "invalid DICOM PixelRepresentation (expected 0 or 1)")
    if samples == 3 and _integer(dataset, "PlanarConfiguration", uri) not in (0, 1):
        raise ImageDecodeError(uri, "invalid DICOM PlanarConfiguration (expected 0 or 1)")
    rows, columns = _integer(dataset, "Rows", uri), _integer(dataset, "Columns", uri)
    stated = field_value(dataset, "NumberOfFrames", uri) is not None
    return Layout(rows, columns, samples, bits_allocated, photometric, stated)


def _photometric(dataset: Dataset, uri: str) -> str:
    value = field_value(dataset, "PhotometricInterpretation", uri)
    text = value.strip() if isinstance(value, str) else None
    if text in _GRAY or text in COLOUR or text == PALETTE:
        return text
    if text in _STANDARD_UNSUPPORTED:
        raise ImageDecodeError(uri, f"unsupported DICOM photometric interpretation {text}")
    what = "(missing)" if value is None else "(non-standard value)"
    raise ImageDecodeError(uri, f"unsupported DICOM photometric interpretation {what}")
