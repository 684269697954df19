"""Hostile, broken and odd inputs for the decoders, generated in code: nothing binary is committed.

``decoder_cases()`` lists ``(file name, content, text the rejection reason must contain)``; an
empty text marks a valid image that must decode. The decoder tests use it, and so does the
end-to-end hostile screening test, which writes every case to a folder and a bucket. Names are
unique; suffixes are the ones screened (a few DICOMs have none, as PACS exports do). All of it is
built in well under a second, and no file exceeds 2 MB.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.dicom_builder import PATIENT_NAME, ROWS, dicom_bytes, radiograph, ramp

__all__ = ["decoder_cases", "deflate_bomb", "deflated_dicom", "encode", "gradient", "pil_bytes", "textured"]


# --- building blocks --------------------------------------------------------------------------


def gradient(
    height: int = 96, width: int = 128, dtype: npt.DTypeLike = np.uint8, high: float = 255, low: float = 0
) -> np.ndarray:
    ramp_row = np.linspace(low, high, width, dtype=np.float64)
    return np.tile(ramp_row, (height, 1)).round().astype(dtype)


def textured(height: int = 256, width: int = 256, seed: int = 0) -> np.ndarray:
    """A gradient with noise: compresses poorly, so cutting the file cuts the image data."""
    noise = np.random.default_rng(seed).integers(0, 40, (height, width))
    return np.clip(gradient(height, width).astype(int) // 2 + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, suffix: str) -> bytes:
    ok, buffer = cv2.imencode(suffix, pixels)
    assert ok
    return buffer.tobytes()


def pil_bytes(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _with(**fields: object) -> bytes:
    return dicom_bytes(radiograph(**fields))


def _text_in(tag: int, text: str) -> bytes:
    """A radiograph whose element ``tag`` holds ``text`` whatever its VR."""
    dataset = radiograph()
    dataset.add_new(tag, "LO", text)
    return dicom_bytes(dataset, implicit=True)


def _vr_swapped(tag: int, vr: str, value: object) -> bytes:
    """A radiograph whose element ``tag`` is written with another VR (explicit VR keeps it)."""
    dataset = radiograph()
    dataset.add_new(tag, vr, value)
    return dicom_bytes(dataset)


def _odd_length_rows() -> bytes:
    """Rows (US, two bytes a value) holding three bytes: pydicom cannot convert it."""
    data = dicom_bytes(radiograph(), implicit=True)
    element = struct.pack("<HHI", 0x0028, 0x0010, 2) + struct.pack("<H", ROWS)
    assert data.count(element) == 1
    return data.replace(element, struct.pack("<HHI", 0x0028, 0x0010, 3) + struct.pack("<H", ROWS) + b"\x00")


def _frames(count: int, stated: int | None) -> bytes:
    dataset = radiograph(np.stack([ramp(0, 4000 - 100 * i) for i in range(count)]))
    if stated is None:
        del dataset.NumberOfFrames
    else:
        dataset.NumberOfFrames = stated
    return dicom_bytes(dataset)


def _short_pixel_data() -> bytes:
    dataset = radiograph()
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    return dicom_bytes(dataset)


def _voi_lut(entries_declared: int, entries_held: int) -> bytes:
    dataset = radiograph(ramp(0, 255), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [entries_declared, 0, 12]
    item.add_new(0x00283006, "OW", np.linspace(0, 4095, entries_held).astype("<u2").tobytes())
    dataset.VOILUTSequence = Sequence([item])
    return dicom_bytes(dataset)


def _palette(red_entries_held: int | None) -> bytes:
    dataset = radiograph(ramp(0, 255).astype(np.uint8), photometric="PALETTE COLOR", bits_stored=8)
    table = np.linspace(0, 65535, 256).astype("<u2").tobytes()
    for channel in ("Red", "Green", "Blue"):
        setattr(dataset, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(dataset, f"{channel}PaletteColorLookupTableData", table)
    if red_entries_held is None:
        del dataset.RedPaletteColorLookupTableData
    else:
        dataset.RedPaletteColorLookupTableData = table[: 2 * red_entries_held]
    return dicom_bytes(dataset)


def deflated_dicom(dataset: Dataset) -> bytes:
    """Deflated Explicit VR Little Endian, written by hand: the data set after the file meta is
    one raw deflate stream."""
    explicit = dicom_bytes(dataset)
    meta_end = _meta_end(explicit)
    header = _meta_with_syntax(explicit[:meta_end], DeflatedExplicitVRLittleEndian)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return header + packer.compress(explicit[meta_end:]) + packer.flush()


def deflate_bomb(inflated_bytes: int = 1100 << 20) -> bytes:
    """About 1 MB that inflates to ``inflated_bytes``: a fully flushed deflate block is
    self-contained, so one block of compressed zeros repeated is a valid stream of many zeros."""
    explicit = dicom_bytes(radiograph())
    meta_end = _meta_end(explicit)
    header = _meta_with_syntax(explicit[:meta_end], DeflatedExplicitVRLittleEndian)
    # A pixel data element that claims all of it, so nothing but the size gives it away.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated_bytes)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = packer.compress(element) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    return header + start + block * (inflated_bytes >> 20) + packer.flush()


def _meta_end(data: bytes) -> int:
    """Where the data set starts: after the preamble, 'DICM' and the (0002,0000) group length."""
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def _meta_with_syntax(meta: bytes, syntax: str) -> bytes:
    """The file meta with its transfer syntax replaced and its group length fixed."""
    old = ExplicitVRLittleEndian.encode() + b"\x00"  # 19 characters, padded to even
    value = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")
    old_element = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(old)) + old
    new_element = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value
    assert meta.count(old_element) == 1
    body = meta[144:].replace(old_element, new_element)
    return meta[:140] + struct.pack("<I", len(body)) + body


def _huge_element_length() -> bytes:
    """An element (before the pixel data) whose declared length runs far past the end of file."""
    dataset = radiograph()
    dataset.StudyDescription = "XX"
    data = dicom_bytes(dataset)
    element = struct.pack("<HH2sH", 0x0008, 0x1030, b"LO", 2) + b"XX"
    huge = struct.pack("<HH2sHI", 0x0008, 0x1030, b"UN", 0, 0xFFFFFFF0)
    assert data.count(element) == 1
    return data.replace(element, huge)


# --- raster ---------------------------------------------------------------------------------


def _png_with_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A valid small PNG whose IHDR (checksum fixed) claims another size and layout."""
    data = bytearray(encode(gradient(), ".png"))
    ihdr = bytearray(data[12:29])
    ihdr[4:14] = struct.pack(">IIBB", width, height, bit_depth, colour_type)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _damaged_ihdr() -> bytes:
    data = bytearray(encode(gradient(), ".png"))
    data[20] ^= 0x01  # a bit of the width flipped; the checksum no longer matches
    return bytes(data)


def _corrupt_idat() -> bytes:
    data = bytearray(encode(textured(), ".png"))
    start = data.index(b"IDAT") + 4
    data[start + 100 : start + 140] = bytes(40)
    return bytes(data)


def _idat_claiming(length: int) -> bytes:
    """A small PNG whose IDAT declares ``length`` bytes (OpenCV would allocate them all)."""
    data = bytearray(encode(textured(96, 128), ".png"))
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = struct.pack(">I", length)
    return bytes(data)


def _float_tiff(bad_value: float) -> bytes:
    pixels = gradient(dtype=np.float32, high=1)
    pixels[10, 10] = bad_value
    return encode(pixels, ".tif")


def _tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF header for a width x height 8-bit grayscale image."""
    entries = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 8 + 2 + 12 * 9 + 4),  # StripOffsets: just after the IFD
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, 64),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64)


def _jpeg(height: int = 300, width: int = 300) -> bytes:
    return encode(textured(height, width), ".jpg")


def decoder_cases() -> list[tuple[str, bytes, str]]:
    """(file name, content, text the rejection reason must contain; "" for a valid image)."""
    # pydicom warns, quoting the value, when it writes the hostile ones: not news here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("pydicom")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return _cases()
        finally:
            logger.setLevel(level)


def _cases() -> list[tuple[str, bytes, str]]:
    jpeg, png = _jpeg(), encode(textured(), ".png")
    html = b"<!DOCTYPE html><html><head><title>Login</title></head><body>Session expired</body></html>\n"
    return [
        # valid: these must decode
        ("valid-chest.png", encode(textured(), ".png"), ""),
        ("valid-chest.jpg", jpeg, ""),
        ("IM-VALID-0001", dicom_bytes(radiograph()), ""),
        ("valid-deflated.dcm", deflated_dicom(radiograph()), ""),
        # raster
        ("empty.png", b"", "empty file"),
        ("random.jpg", np.random.default_rng(0).bytes(5000), "not an image"),
        ("radiology-report.png", b"Findings: no acute cardiopulmonary process.\n" * 20, "not an image"),
        ("expired-session.jpg", html, "not an image"),
        ("half-with-end-marker.jpg", jpeg[: len(jpeg) // 2] + b"\xff\xd9", "truncated JPEG"),
        ("cut.jpg", jpeg[: len(jpeg) // 2], "truncated JPEG"),
        ("cut.png", png[: len(png) // 2], "truncated PNG"),
        ("idat-claims-4gb.png", _idat_claiming(0xFFFFFFFF), "truncated PNG: a chunk declares 4294967295 bytes"),
        ("damaged-ihdr.png", _damaged_ihdr(), "damaged PNG header"),
        ("corrupt-idat.png", _corrupt_idat(), "corrupt PNG"),
        ("rgba16-over-budget.png", _png_with_header(6000, 6000, 16, 6), "too large to decode"),
        ("bomb.png", _png_with_header(100_000, 100_000), "too large: 100000x100000"),
        ("inf.tif", _float_tiff(np.inf), "non-finite pixel values"),
        ("nan.tif", _float_tiff(np.nan), "non-finite pixel values"),
        ("huge.tif", _tiff_claiming(100_000, 100_000), "too large: 100000x100000"),
        ("animation-gif.png", pil_bytes(Image.fromarray(gradient()), "GIF"), "unsupported image format GIF"),
        ("photo-webp.jpg", pil_bytes(Image.fromarray(gradient()), "WEBP"), "unsupported image format WEBP"),
        ("blank.png", encode(np.full((100, 100), 7, np.uint8), ".png"), "blank image"),
        ("tiny.png", encode(gradient(32, 200), ".png"), "too small: 200x32"),
        # DICOM: frames
        ("frames-text.dcm", _text_in(0x00280008, "abc"), "invalid DICOM NumberOfFrames: not an integer"),
        ("frames-zero.dcm", _with(NumberOfFrames=0), "invalid DICOM NumberOfFrames 0"),
        ("frames-negative.dcm", _with(NumberOfFrames=-3), "invalid DICOM NumberOfFrames -3"),
        ("frames-huge.dcm", _with(NumberOfFrames=2_147_483_647), "multi-frame DICOM (2147483647 frames)"),
        ("cine.dcm", _frames(3, stated=3), "multi-frame DICOM (3 frames)"),
        ("IM-TWO-FRAMES", _frames(2, stated=None), "32000 bytes, 2 frames of 16000 bytes"),
        ("two-frames-stated-one.dcm", _frames(2, stated=1), "NumberOfFrames is 1"),
        ("short-pixel-data.dcm", _short_pixel_data(), "truncated DICOM pixel data: 8000 bytes, expected 16000"),
        ("IM-HUGE-LENGTH", _huge_element_length(), "truncated DICOM: element (0008,1030) declares 4294967280 bytes"),
        ("no-pixel-data.dcm", dicom_bytes(_without_pixels()), "DICOM without pixel data"),
        # DICOM: display transform
        ("slope-text.dcm", _text_in(0x00281053, "abc"), "invalid DICOM RescaleSlope: not a number"),
        ("slope-inf.dcm", _text_in(0x00281053, "inf"), "invalid DICOM RescaleSlope: not a finite number"),
        ("intercept-nan.dcm", _text_in(0x00281052, "nan"), "invalid DICOM RescaleIntercept: not a finite number"),
        ("voi-lut-short.dcm", _voi_lut(256, 100), "broken VOI LUT: the descriptor says 256 entries, the table holds 100"),
        ("window-zero.dcm", _with(WindowCenter=2000, WindowWidth=0), "invalid DICOM WindowWidth 0 (must be at least 1)"),
        ("window-negative.dcm", _with(WindowCenter=2000, WindowWidth=-40), "invalid DICOM WindowWidth -40"),
        ("window-function-name.dcm", _with(WindowCenter=2000, WindowWidth=400, VOILUTFunction="DOE"),
         "unsupported DICOM VOI LUT function (non-standard value)"),
        # DICOM: image pixel module
        ("rows-text.dcm", _text_in(0x00280010, "abc"), "invalid DICOM Rows: several values where one is expected"),
        ("rows-as-text.dcm", _vr_swapped(0x00280010, "LO", "abc"), "invalid DICOM Rows: not an integer"),
        ("IM-ROWS-ODD-LENGTH", _odd_length_rows(), "unreadable DICOM Rows (pydicom.BytesLengthException)"),
        ("rows-zero.dcm", _with(Rows=0), "corrupt header: size 100x0"),
        ("rows-huge.dcm", _with(Rows=65535, Columns=65535), "too large: 65535x65535"),
        ("bits-allocated-0.dcm", _with(BitsAllocated=0), "unsupported DICOM BitsAllocated 0 (expected 8 or 16)"),
        ("bits-allocated-7.dcm", _with(BitsAllocated=7), "unsupported DICOM BitsAllocated 7 (expected 8 or 16)"),
        ("bits-allocated-64.dcm", _with(BitsAllocated=64), "unsupported DICOM BitsAllocated 64 (expected 8 or 16)"),
        ("bits-stored-20.dcm", _with(BitsStored=20), "invalid DICOM BitsStored 20 for BitsAllocated 16"),
        ("samples-0.dcm", _with(SamplesPerPixel=0), "unsupported DICOM SamplesPerPixel 0 (expected 1 or 3)"),
        ("samples-2.dcm", _with(SamplesPerPixel=2), "unsupported DICOM SamplesPerPixel 2 (expected 1 or 3)"),
        ("samples-5.dcm", _with(SamplesPerPixel=5), "unsupported DICOM SamplesPerPixel 5 (expected 1 or 3)"),
        ("IM-PHOTOMETRIC-NAME", _with(PhotometricInterpretation=PATIENT_NAME),
         "unsupported DICOM photometric interpretation (non-standard value)"),
        ("palette-short.dcm", _palette(red_entries_held=100),
         "broken PALETTE COLOR red lookup table: the descriptor says 256 entries, the table holds 200 bytes"),
        ("palette-missing.dcm", _palette(red_entries_held=None), "PALETTE COLOR without its red lookup table"),
        # DICOM: deflate
        ("deflate-bomb.dcm", deflate_bomb(), "deflated DICOM inflates to more than"),
    ]


def _without_pixels() -> Dataset:
    dataset = radiograph()
    del dataset.PixelData
    return dataset
