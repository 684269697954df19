"""The display transform a radiologist's viewer would apply to DICOM pixels, as one uint8 lookup.

Modality LUT (rescale slope/intercept), then the VOI LUT or window when the file carries one,
else the values actually present; MONOCHROME1 (white = low) is inverted so bone is always bright.
PALETTE COLOR pixels go through their red, green and blue tables. Every table and window is checked
before pydicom applies it. The transforms are computed once per possible stored value (at most
65536) and applied as one uint8 lookup, so no float copy of the image is made.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging.dicom_fields import DICOM_FAILURES, field_numbers, field_value, is_multi
from imaging.limits import ImageDecodeError, error_kind
from imaging.sample_scaling import lookup_domain, scale_table

__all__ = ["display_gray", "palette_to_rgb"]

_VOI_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}


def _present(index: np.ndarray, size: int) -> np.ndarray:
    """Which table entries the image uses (marking them makes no copy of the image; bincount would
    widen every index to int64)."""
    present = np.zeros(size, bool)
    present[index] = True
    return present


def _table_to_uint8(values: np.ndarray, present: np.ndarray, uri: str) -> np.ndarray:
    """Scale a table over the entries the image uses, as if the image itself had been scaled."""
    used = values[present]
    low, high = float(used.min()), float(used.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageDecodeError(uri, "non-finite pixel values after the DICOM rescale or window")
    values[~present] = low  # never looked up; keeps unused inf/NaN out of the arithmetic
    return scale_table(values, low, high)


# --- grayscale display ------------------------------------------------------------------------


def display_gray(pixels: np.ndarray, dataset: Dataset, uri: str, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _check_display_fields(dataset, uri)
    index, stored = lookup_domain(pixels)
    try:
        values = np.array(apply_voi_lut(apply_modality_lut(stored, dataset), dataset), dtype=np.float64)
    except DICOM_FAILURES as error:
        raise ImageDecodeError(
            uri, f"the DICOM display transform (rescale, LUT or window) cannot be applied ({error_kind(error)})"
        ) from None
    table = _table_to_uint8(values, _present(index, len(stored)), uri)
    return (255 - table if invert else table)[index]


def _check_display_fields(dataset: Dataset, uri: str) -> None:
    """What pydicom's modality and VOI transforms will read, checked in the order it reads them."""
    field_numbers(dataset, "RescaleSlope", uri, single=True)
    field_numbers(dataset, "RescaleIntercept", uri, single=True)
    modality = _first_item(dataset, "ModalityLUTSequence", uri)
    if modality is not None:
        _check_lut(modality, "modality LUT", uri)
    voi = _first_item(dataset, "VOILUTSequence", uri)
    if voi is not None and "LUTDescriptor" in voi and "LUTData" in voi:
        _check_lut(voi, "VOI LUT", uri)  # pydicom prefers it to the window
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        _check_window(dataset, uri)


def _first_item(dataset: Dataset, keyword: str, uri: str) -> Dataset | None:
    value = field_value(dataset, keyword, uri)
    if value is None:
        return None
    if not isinstance(value, Sequence):
        raise ImageDecodeError(uri, f"invalid DICOM {keyword}: not a sequence")
    return value[0] if len(value) else None


def _check_lut(item: Dataset, what: str, uri: str) -> None:
    descriptor, data = field_value(item, "LUTDescriptor", uri), field_value(item, "LUTData", uri)
    if descriptor is None or data is None:
        raise ImageDecodeError(uri, f"broken {what}: its descriptor or its data is missing")
    entries, bits = _descriptor(descriptor, what, uri)
    if bits != 8 and not 10 <= bits <= 16:
        raise ImageDecodeError(uri, f"broken {what}: {bits} bits per entry (expected 8 or 10 to 16)")
    held = len(data) // 2 if isinstance(data, bytes) else len(data) if is_multi(data) else 1
    if held < entries:
        raise ImageDecodeError(uri, f"broken {what}: the descriptor says {entries} entries, the table holds {held}")


def _descriptor(value: object, what: str, uri: str) -> tuple[int, int]:
    """Entries (0 meaning 65536) and bits per entry of a LUT descriptor."""
    items = list(value) if is_multi(value) else []
    if len(items) != 3 or not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise ImageDecodeError(uri, f"broken {what}: the descriptor is not three integers")
    entries = items[0] or 65536
    if not 0 < entries <= 65536:
        raise ImageDecodeError(uri, f"broken {what}: the descriptor says {entries} entries")
    return entries, items[2]


def _check_window(dataset: Dataset, uri: str) -> None:
    function = field_value(dataset, "VOILUTFunction", uri)
    name = function.strip().upper() if isinstance(function, str) else "LINEAR" if function is None else None
    if name not in _VOI_FUNCTIONS:
        raise ImageDecodeError(uri, "unsupported DICOM VOI LUT function (non-standard value)")
    centers, widths = field_numbers(dataset, "WindowCenter", uri), field_numbers(dataset, "WindowWidth", uri)
    if not centers or not widths:
        raise ImageDecodeError(uri, "invalid DICOM window: WindowCenter or WindowWidth is empty")
    width = widths[0]  # the first view is the one applied
    if name == "LINEAR" and width < 1:
        raise ImageDecodeError(uri, f"invalid DICOM WindowWidth {width:g} (must be at least 1)")
    if width <= 0:
        raise ImageDecodeError(uri, f"invalid DICOM WindowWidth {width:g} (must be above 0)")


# --- palette colour ---------------------------------------------------------------------------

_PALETTE_CHANNELS = ("Red", "Green", "Blue")


def palette_to_rgb(pixels: np.ndarray, dataset: Dataset, uri: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    _check_palette(dataset, uri)
    index, stored = lookup_domain(pixels)
    try:
        colours = apply_color_lut(stored, dataset)[:, :3]
    except DICOM_FAILURES as error:
        raise ImageDecodeError(uri, f"broken PALETTE COLOR lookup table ({error_kind(error)})") from None
    if colours.dtype != np.uint8:
        present = _present(index, len(stored))
        colours = _table_to_uint8(colours.astype(np.float64), present, uri)
    return colours[index]


def _check_palette(dataset: Dataset, uri: str) -> None:
    # Segmented tables expand by copying earlier segments: a few bytes can ask for gigabytes,
    # and no radiograph uses them.
    if "SegmentedRedPaletteColorLookupTableData" in dataset:
        raise ImageDecodeError(uri, "segmented PALETTE COLOR lookup tables are not supported")
    lengths = set()
    for channel in _PALETTE_CHANNELS:
        descriptor = field_value(dataset, f"{channel}PaletteColorLookupTableDescriptor", uri)
        data = field_value(dataset, f"{channel}PaletteColorLookupTableData", uri)
        if descriptor is None or data is None:
            raise ImageDecodeError(uri, f"PALETTE COLOR without its {channel.lower()} lookup table")
        what = f"PALETTE COLOR {channel.lower()} lookup table"
        entries, bits = _descriptor(descriptor, what, uri)
        if bits not in (8, 16):
            raise ImageDecodeError(uri, f"broken {what}: {bits} bits per entry (expected 8 or 16)")
        if not isinstance(data, bytes) or len(data) not in (entries, 2 * entries):
            held = len(data) if isinstance(data, bytes) else 0
            raise ImageDecodeError(
                uri, f"broken {what}: the descriptor says {entries} entries, the table holds {held} bytes"
            )
        lengths.add((entries, len(data)))
    if len(lengths) != 1:
        raise ImageDecodeError(uri, "broken PALETTE COLOR lookup tables: red, green and blue differ in length")
