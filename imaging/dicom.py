"""DICOM to a uint8 image with the display transform a radiologist's viewer would apply.

The data set is read (a deflated one inflated in bounded steps), its layout checked from the header
(``imaging.dicom_fields``) and its pixel data checked against that layout before pydicom decodes it;
grayscale and palette pixels then go through ``imaging.dicom_display``. The study's identifiers come
from the same header (``imaging.dicom_guard``), which may also refuse what is not a frontal chest X-ray
before any pixel is decoded. Every header value is untrusted, and a reason never quotes header text
(any string element can carry a patient's name), only numbers we parsed and names of our own.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from imaging.dicom_display import display_gray, palette_to_rgb
from imaging.dicom_fields import COLOUR, DICOM_FAILURES, PALETTE, Layout, field_value, read_layout
from imaging.dicom_guard import check_frontal_chest, read_study
from imaging.dicom_identity import DicomRejected, Study
from imaging.limits import MAX_DECODED_BYTES, MAX_PIXELS, ImageDecodeError, check_decoded_bytes, check_size, error_kind
from imaging.sample_scaling import to_uint8

__all__ = ["decode_dicom"]

# A deflated data set is the pixels plus the rest of the header; this much header is plenty.
_HEADER_ALLOWANCE = 16 * 1024 * 1024
_INFLATE_INPUT = 1 << 20  # deflated bytes fed per step
_INFLATE_OUTPUT = 4 << 20  # most inflated bytes produced per step


def decode_dicom(
    data: bytes, uri: str, max_pixels: int = MAX_PIXELS, max_decoded_bytes: int = MAX_DECODED_BYTES,
    frontal_chest_only: bool = False,
) -> tuple[np.ndarray, Study]:
    """A 2-D uint8 array (grayscale) or an ``(h, w, 3)`` uint8 RGB array from DICOM bytes, and the
    study it belongs to. With ``frontal_chest_only``, a study whose header says it is something else
    is refused (``imaging.dicom_guard``). A refusal after the header was read is a ``DicomRejected``,
    which names the study too."""
    try:
        dataset = _read(data, uri, max_decoded_bytes + _HEADER_ALLOWANCE)
        _check_element_lengths(dataset, uri)
    except (BytesLengthException, InvalidDicomError) as error:  # wherever else pydicom raises them
        raise ImageDecodeError(uri, f"corrupt DICOM ({error_kind(error)})") from None
    study = read_study(dataset, uri)
    try:
        return _decode(dataset, uri, max_pixels, max_decoded_bytes, frontal_chest_only), study
    except ImageDecodeError as error:
        raise DicomRejected(uri, error.reason, study) from None
    except (BytesLengthException, InvalidDicomError) as error:
        raise DicomRejected(uri, f"corrupt DICOM ({error_kind(error)})", study) from None


def _decode(
    dataset: Dataset, uri: str, max_pixels: int, max_decoded_bytes: int, frontal_chest_only: bool
) -> np.ndarray:
    if "PixelData" not in dataset:
        raise ImageDecodeError(uri, f"DICOM without pixel data{_sop_class(dataset, uri)}: not an image")
    if frontal_chest_only:
        check_frontal_chest(dataset, uri)
    layout = read_layout(dataset, uri)
    check_size(uri, layout.columns, layout.rows, max_pixels)
    check_decoded_bytes(uri, layout.columns, layout.rows, layout.samples, layout.bits_allocated, max_decoded_bytes)
    transfer_syntax = _transfer_syntax(dataset, uri)
    if transfer_syntax is None or not transfer_syntax.is_encapsulated:
        _check_native_length(dataset, layout, uri)
    else:
        _check_encapsulated_frames(dataset, layout, uri)
    pixels = _pixel_array(dataset, transfer_syntax, layout, uri)
    if layout.photometric == PALETTE:
        return palette_to_rgb(pixels, dataset, uri)
    if layout.photometric in COLOUR:
        return to_uint8(pixels, uri)
    return display_gray(pixels, dataset, uri, invert=layout.photometric == "MONOCHROME1")


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
    except DICOM_FAILURES as error:
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

    value = field_value(dataset, "SOPClassUID", uri)
    # Only a registered UID's name: an unregistered "UID" is free text from the file.
    return f" ({UID_dictionary[value][0]})" if isinstance(value, str) and value in UID_dictionary else ""


def _transfer_syntax(dataset: Dataset, uri: str) -> UID | None:
    meta = getattr(dataset, "file_meta", None)
    value = field_value(meta, "TransferSyntaxUID", uri) if meta is not None else None
    if value is None:
        return None  # a bare data set: pydicom reads it as uncompressed
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
        raise ImageDecodeError(uri, "unsupported DICOM transfer syntax (non-standard UID)")
    return uid


# --- pixel data -------------------------------------------------------------------------------


def _check_native_length(dataset: Dataset, layout: Layout, uri: str) -> None:
    """Uncompressed pixel data must hold exactly one frame: less is a truncated file, a whole
    frame more is a multi-frame image whose NumberOfFrames is missing, and we do not guess."""
    value = field_value(dataset, "PixelData", uri)
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


def _check_encapsulated_frames(dataset: Dataset, layout: Layout, uri: str) -> None:
    """Compressed frames are listed in the offset tables, when there are any (they are optional):
    more than one entry is a multi-frame image whose NumberOfFrames is missing."""
    from pydicom.encaps import parse_basic_offsets

    value = field_value(dataset, "PixelData", uri)
    if not isinstance(value, (bytes, bytearray)):
        raise ImageDecodeError(uri, "corrupt DICOM pixel data element (not a byte string)")
    try:
        frames = len(parse_basic_offsets(value))
    except DICOM_FAILURES as error:
        raise ImageDecodeError(uri, f"corrupt compressed DICOM pixel data ({error_kind(error)})") from None
    extended = field_value(dataset, "ExtendedOffsetTable", uri)
    if isinstance(extended, bytes):
        frames = max(frames, len(extended) // 8)
    if frames > 1:
        stated = "1" if layout.frames_stated else "absent"
        raise ImageDecodeError(
            uri,
            f"compressed DICOM pixel data lists {frames} frames in its offset table, but NumberOfFrames "
            f"is {stated}: not guessing which frame to show",
        )


def _pixel_array(dataset: Dataset, transfer_syntax: UID | None, layout: Layout, uri: str) -> np.ndarray:
    from pydicom.pixels import get_decoder

    if transfer_syntax is not None and transfer_syntax.is_encapsulated:
        try:
            available = get_decoder(transfer_syntax).is_available
        except DICOM_FAILURES:  # no decoder exists for this syntax at all
            available = False
        if not available:
            raise ImageDecodeError(
                uri, f"unsupported DICOM compression ({transfer_syntax.name}): no installed decoder can read it"
            )
    try:
        pixels = dataset.pixel_array
        del dataset.PixelData  # its bytes are no longer needed: free them before the conversions
    except DICOM_FAILURES as error:
        raise ImageDecodeError(uri, f"truncated or corrupt DICOM pixel data ({error_kind(error)})") from None
    expected = (layout.rows, layout.columns) + ((3,) if layout.samples == 3 else ())
    if pixels.shape != expected or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
        raise ImageDecodeError(uri, f"DICOM pixel data decoded to {pixels.shape} {pixels.dtype}, expected {expected}")
    return pixels
