"""DICOM to a uint8 image with the display transform a radiologist's viewer would apply.

Modality LUT (rescale slope/intercept), then the VOI LUT or window when the file carries one,
else the values actually present; MONOCHROME1 (white = low) is inverted so bone is always bright.

Every header value is untrusted: each one used is checked for type and range before any pixel is
allocated, and a reason never quotes header text (any string element can carry a patient's name),
only numbers we parsed and names of our own. The transforms are computed once per possible stored
value (at most 65536) and applied as one uint8 lookup, so no float copy of the image is made.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from tasks.images import (
    DECODER_FAILURES,
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    ImageDecodeError,
    check_decoded_bytes,
    check_size,
    error_kind,
    lookup_domain,
    scale_table,
    to_uint8,
)

__all__ = ["decode_dicom"]

# pydicom's own exceptions derive from Exception alone; its messages quote element values.
_FAILURES = (*DECODER_FAILURES, BytesLengthException, InvalidDicomError)
_GRAY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422"}
_PALETTE = "PALETTE COLOR"
# Defined terms of PS3.3 C.7.6.3.1.2 that we do not decode: fixed words, safe to name in a reason.
_STANDARD_UNSUPPORTED = {"YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYB"}
_VOI_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}
# A deflated data set is the pixels plus the rest of the header; this much header is plenty.
_HEADER_ALLOWANCE = 16 * 1024 * 1024
_INFLATE_INPUT = 1 << 20  # deflated bytes fed per step
_INFLATE_OUTPUT = 4 << 20  # most inflated bytes produced per step


@dataclass(frozen=True)
class _Layout:
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    photometric: str
    frames_stated: bool  # NumberOfFrames present (and 1) rather than absent


def decode_dicom(
    data: bytes, uri: str, max_pixels: int = MAX_PIXELS, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> np.ndarray:
    """A 2-D uint8 array (grayscale) or an ``(h, w, 3)`` uint8 RGB array from DICOM bytes."""
    try:
        return _decode(data, uri, max_pixels, max_decoded_bytes)
    except (BytesLengthException, InvalidDicomError) as error:  # wherever else pydicom raises them
        raise ImageDecodeError(uri, f"corrupt DICOM ({error_kind(error)})") from None


def _decode(data: bytes, uri: str, max_pixels: int, max_decoded_bytes: int) -> np.ndarray:
    dataset = _read(data, uri, max_decoded_bytes + _HEADER_ALLOWANCE)
    _check_element_lengths(dataset, uri)
    if "PixelData" not in dataset:
        raise ImageDecodeError(uri, f"DICOM without pixel data{_sop_class(dataset, uri)}: not an image")
    layout = _layout(dataset, uri)
    check_size(uri, layout.columns, layout.rows, max_pixels)
    check_decoded_bytes(uri, layout.columns, layout.rows, layout.samples, layout.bits_allocated, max_decoded_bytes)
    transfer_syntax = _transfer_syntax(dataset, uri)
    if transfer_syntax is None or not transfer_syntax.is_encapsulated:
        _check_native_length(dataset, layout, uri)
    else:
        _check_encapsulated_frames(dataset, layout, uri)
    pixels = _pixel_array(dataset, transfer_syntax, layout, uri)
    if layout.photometric == _PALETTE:
        return _palette_to_rgb(pixels, dataset, uri)
    if layout.photometric in _COLOUR:
        return to_uint8(pixels, uri)
    return _display_gray(pixels, dataset, uri, invert=layout.photometric == "MONOCHROME1")


# --- reading ----------------------------------------------------------------------------------


def _read(data: bytes, uri: str, inflate_limit: int) -> Dataset:
    """The data set, with a deflated one inflated in bounded steps (pydicom inflates it whole)."""
    # The file meta parser dcmread itself uses, so the transfer syntax is seen exactly as it will.
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    try:
        source = io.BytesIO(data)
        read_preamble(source, force=True)
        meta = _read_file_meta_info(source)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        inflated = _inflate(memoryview(data)[source.tell() :], inflate_limit, uri)
        dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True)
        dataset.file_meta = meta
        return dataset
    except ImageDecodeError:
        raise
    except _FAILURES as error:
        raise ImageDecodeError(uri, f"corrupt DICOM: the data set cannot be parsed ({error_kind(error)})") from None


def _inflate(deflated: memoryview, limit: int, uri: str) -> io.BytesIO:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = io.BytesIO()
    for start in range(0, len(deflated), _INFLATE_INPUT):
        pending: bytes | memoryview = deflated[start : start + _INFLATE_INPUT]
        while not inflater.eof:
            piece = inflater.decompress(pending, _INFLATE_OUTPUT)
            inflated.write(piece)
            if inflated.tell() > limit:
                raise ImageDecodeError(
                    uri, f"deflated DICOM inflates to more than {limit / 2**20:.0f} MiB: refused before parsing it"
                )
            pending = inflater.unconsumed_tail
            if not pending and len(piece) < _INFLATE_OUTPUT:
                break  # this input is used up and zlib holds no output back
        if inflater.eof:
            break
    if not inflater.eof:
        raise ImageDecodeError(uri, "truncated deflated DICOM: the compressed data set ends early")
    inflated.seek(0)
    return inflated


def _check_element_lengths(dataset: Dataset, uri: str) -> None:
    """pydicom keeps an element whose declared length runs past the end of the file, cut short
    and without a word; the file is truncated (or the length is a lie) either way."""
    for tag in dataset.keys():
        element = dataset.get_item(tag, keep_deferred=True)  # as read: converting could raise
        length, value = getattr(element, "length", None), getattr(element, "value", None)
        if isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF and len(value) < length:
            tag = int(element.tag)
            raise ImageDecodeError(
                uri,
                f"truncated DICOM: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                f"only {len(value)} remain in the file",
            )


def _sop_class(dataset: Dataset, uri: str) -> str:
    from pydicom.uid import UID_dictionary

    value = _value(dataset, "SOPClassUID", uri)
    # Only a registered UID's name: an unregistered "UID" is free text from the file.
    return f" ({UID_dictionary[value][0]})" if isinstance(value, str) and value in UID_dictionary else ""


def _transfer_syntax(dataset: Dataset, uri: str) -> UID | None:
    meta = getattr(dataset, "file_meta", None)
    value = _value(meta, "TransferSyntaxUID", uri) if meta is not None else None
    if value is None:
        return None  # a bare data set: pydicom reads it as uncompressed
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
        raise ImageDecodeError(uri, "unsupported DICOM transfer syntax (non-standard UID)")
    return uid


# --- header fields ----------------------------------------------------------------------------


def _value(dataset: Dataset, keyword: str, uri: str) -> object | None:
    """An element's value, None when absent or empty; values are converted lazily, so this raises."""
    try:
        value = dataset.get(keyword)
    except _FAILURES as error:
        raise ImageDecodeError(uri, f"unreadable DICOM {keyword} ({error_kind(error)})") from None
    return None if value is None or (isinstance(value, (str, bytes)) and not value) else value


def _integer(dataset: Dataset, keyword: str, uri: str, default: int | None = None) -> int:
    value = _value(dataset, keyword, uri)
    if value is None:
        if default is None:
            raise ImageDecodeError(uri, f"missing DICOM {keyword}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):  # IS "abc" stays a str
        raise ImageDecodeError(uri, f"invalid DICOM {keyword}: {_not_one(value, 'an integer')}")
    return int(value)


def _numbers(dataset: Dataset, keyword: str, uri: str, single: bool = False) -> list[float]:
    """The finite numbers of a DS element (empty when absent)."""
    value = _value(dataset, keyword, uri)
    if value is None:
        return []
    values = list(value) if _is_multi(value) and not single else [value]
    for number in values:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ImageDecodeError(uri, f"invalid DICOM {keyword}: {_not_one(number, 'a number')}")
        if not math.isfinite(number):
            raise ImageDecodeError(uri, f"invalid DICOM {keyword}: not a finite number")
    return [float(number) for number in values]


def _is_multi(value: object) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def _not_one(value: object, what: str) -> str:
    return "several values where one is expected" if _is_multi(value) else f"not {what}"


def _layout(dataset: Dataset, uri: str) -> _Layout:
    frames = _integer(dataset, "NumberOfFrames", uri, default=1)
    if frames < 1:
        raise ImageDecodeError(uri, f"invalid DICOM NumberOfFrames {frames} (must be at least 1)")
    if frames > 1:
        raise ImageDecodeError(uri, f"multi-frame DICOM ({frames} frames) is not supported: expected one radiograph")
    photometric = _photometric(dataset, uri)
    samples = _integer(dataset, "SamplesPerPixel", uri)
    if samples not in (1, 3):
        raise ImageDecodeError(uri, f"unsupported DICOM SamplesPerPixel {samples} (expected 1 or 3)")
    if samples != (3 if photometric in _COLOUR else 1):
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
    stated = _value(dataset, "NumberOfFrames", uri) is not None
    return _Layout(rows, columns, samples, bits_allocated, photometric, stated)


def _photometric(dataset: Dataset, uri: str) -> str:
    value = _value(dataset, "PhotometricInterpretation", uri)
    text = value.strip() if isinstance(value, str) else None
    if text in _GRAY or text in _COLOUR or text == _PALETTE:
        return text
    if text in _STANDARD_UNSUPPORTED:
        raise ImageDecodeError(uri, f"unsupported DICOM photometric interpretation {text}")
    what = "(missing)" if value is None else "(non-standard value)"
    raise ImageDecodeError(uri, f"unsupported DICOM photometric interpretation {what}")


# --- pixel data -------------------------------------------------------------------------------


def _check_native_length(dataset: Dataset, layout: _Layout, uri: str) -> None:
    """Uncompressed pixel data must hold exactly one frame: less is a truncated file, a whole
    frame more is a multi-frame image whose NumberOfFrames is missing, and we do not guess."""
    value = _value(dataset, "PixelData", uri)
    if not isinstance(value, (bytes, bytearray)):
        raise ImageDecodeError(uri, "corrupt DICOM pixel data element (not a byte string)")
    samples = 2 if layout.photometric == "YBR_FULL_422" else layout.samples  # 4:2:2 halves chroma
    frame = layout.rows * layout.columns * samples * layout.bits_allocated // 8
    size = f"{layout.columns}x{layout.rows} at {layout.bits_allocated} bits"
    if len(value) < frame:
        raise ImageDecodeError(uri, f"truncated DICOM pixel data: {len(value)} bytes, expected {frame} for {size}")
    if len(value) >= 2 * frame:
        stated = "1" if layout.frames_stated else "absent"
        raise ImageDecodeError(
            uri,
            f"DICOM pixel data holds {len(value)} bytes, {len(value) // frame} frames of {frame} bytes "
            f"for {size}, but NumberOfFrames is {stated}: not guessing which frame to show",
        )


def _check_encapsulated_frames(dataset: Dataset, layout: _Layout, uri: str) -> None:
    """Compressed frames are listed in the offset tables, when there are any (they are optional):
    more than one entry is a multi-frame image whose NumberOfFrames is missing."""
    from pydicom.encaps import parse_basic_offsets

    value = _value(dataset, "PixelData", uri)
    if not isinstance(value, (bytes, bytearray)):
        raise ImageDecodeError(uri, "corrupt DICOM pixel data element (not a byte string)")
    try:
        frames = len(parse_basic_offsets(value))
    except _FAILURES as error:
        raise ImageDecodeError(uri, f"corrupt compressed DICOM pixel data ({error_kind(error)})") from None
    extended = _value(dataset, "ExtendedOffsetTable", uri)
    if isinstance(extended, bytes):
        frames = max(frames, len(extended) // 8)
    if frames > 1:
        stated = "1" if layout.frames_stated else "absent"
        raise ImageDecodeError(
            uri,
            f"compressed DICOM pixel data lists {frames} frames in its offset table, but NumberOfFrames "
            f"is {stated}: not guessing which frame to show",
        )


def _pixel_array(dataset: Dataset, transfer_syntax: UID | None, layout: _Layout, uri: str) -> np.ndarray:
    from pydicom.pixels import get_decoder

    if transfer_syntax is not None and transfer_syntax.is_encapsulated:
        try:
            available = get_decoder(transfer_syntax).is_available
        except _FAILURES:  # no decoder exists for this syntax at all
            available = False
        if not available:
            raise ImageDecodeError(
                uri, f"unsupported DICOM compression ({transfer_syntax.name}): no installed decoder can read it"
            )
    try:
        pixels = dataset.pixel_array
        del dataset.PixelData  # its bytes are no longer needed: free them before the conversions
    except _FAILURES as error:
        raise ImageDecodeError(uri, f"truncated or corrupt DICOM pixel data ({error_kind(error)})") from None
    expected = (layout.rows, layout.columns) + ((3,) if layout.samples == 3 else ())
    if pixels.shape != expected or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
        raise ImageDecodeError(uri, f"DICOM pixel data decoded to {pixels.shape} {pixels.dtype}, expected {expected}")
    return pixels


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


def _display_gray(pixels: np.ndarray, dataset: Dataset, uri: str, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _check_display_fields(dataset, uri)
    index, stored = lookup_domain(pixels)
    try:
        values = np.array(apply_voi_lut(apply_modality_lut(stored, dataset), dataset), dtype=np.float64)
    except _FAILURES as error:
        raise ImageDecodeError(
            uri, f"the DICOM display transform (rescale, LUT or window) cannot be applied ({error_kind(error)})"
        ) from None
    table = _table_to_uint8(values, _present(index, len(stored)), uri)
    return (255 - table if invert else table)[index]


def _check_display_fields(dataset: Dataset, uri: str) -> None:
    """What pydicom's modality and VOI transforms will read, checked in the order it reads them."""
    _numbers(dataset, "RescaleSlope", uri, single=True)
    _numbers(dataset, "RescaleIntercept", uri, single=True)
    modality = _first_item(dataset, "ModalityLUTSequence", uri)
    if modality is not None:
        _check_lut(modality, "modality LUT", uri)
    voi = _first_item(dataset, "VOILUTSequence", uri)
    if voi is not None and "LUTDescriptor" in voi and "LUTData" in voi:
        _check_lut(voi, "VOI LUT", uri)  # pydicom prefers it to the window
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        _check_window(dataset, uri)


def _first_item(dataset: Dataset, keyword: str, uri: str) -> Dataset | None:
    value = _value(dataset, keyword, uri)
    if value is None:
        return None
    if not isinstance(value, Sequence):
        raise ImageDecodeError(uri, f"invalid DICOM {keyword}: not a sequence")
    return value[0] if len(value) else None


def _check_lut(item: Dataset, what: str, uri: str) -> None:
    descriptor, data = _value(item, "LUTDescriptor", uri), _value(item, "LUTData", uri)
    if descriptor is None or data is None:
        raise ImageDecodeError(uri, f"broken {what}: its descriptor or its data is missing")
    entries, bits = _descriptor(descriptor, what, uri)
    if bits != 8 and not 10 <= bits <= 16:
        raise ImageDecodeError(uri, f"broken {what}: {bits} bits per entry (expected 8 or 10 to 16)")
    held = len(data) // 2 if isinstance(data, bytes) else len(data) if _is_multi(data) else 1
    if held < entries:
        raise ImageDecodeError(uri, f"broken {what}: the descriptor says {entries} entries, the table holds {held}")


def _descriptor(value: object, what: str, uri: str) -> tuple[int, int]:
    """Entries (0 meaning 65536) and bits per entry of a LUT descriptor."""
    items = list(value) if _is_multi(value) else []
    if len(items) != 3 or not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise ImageDecodeError(uri, f"broken {what}: the descriptor is not three integers")
    entries = items[0] or 65536
    if not 0 < entries <= 65536:
        raise ImageDecodeError(uri, f"broken {what}: the descriptor says {entries} entries")
    return entries, items[2]


def _check_window(dataset: Dataset, uri: str) -> None:
    function = _value(dataset, "VOILUTFunction", uri)
    name = function.strip().upper() if isinstance(function, str) else "LINEAR" if function is None else None
    if name not in _VOI_FUNCTIONS:
        raise ImageDecodeError(uri, "unsupported DICOM VOI LUT function (non-standard value)")
    centers, widths = _numbers(dataset, "WindowCenter", uri), _numbers(dataset, "WindowWidth", uri)
    if not centers or not widths:
        raise ImageDecodeError(uri, "invalid DICOM window: WindowCenter or WindowWidth is empty")
    width = widths[0]  # the first view is the one applied
    if name == "LINEAR" and width < 1:
        raise ImageDecodeError(uri, f"invalid DICOM WindowWidth {width:g} (must be at least 1)")
    if width <= 0:
        raise ImageDecodeError(uri, f"invalid DICOM WindowWidth {width:g} (must be above 0)")


# --- palette colour ---------------------------------------------------------------------------

_PALETTE_CHANNELS = ("Red", "Green", "Blue")


def _palette_to_rgb(pixels: np.ndarray, dataset: Dataset, uri: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    _check_palette(dataset, uri)
    index, stored = lookup_domain(pixels)
    try:
        colours = apply_color_lut(stored, dataset)[:, :3]
    except _FAILURES as error:
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
        descriptor = _value(dataset, f"{channel}PaletteColorLookupTableDescriptor", uri)
        data = _value(dataset, f"{channel}PaletteColorLookupTableData", uri)
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
