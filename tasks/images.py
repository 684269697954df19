"""Bytes of an X-ray file to a uint8 RGB array, or one clear error saying why not.

Handles PNG, JPEG, BMP and TIFF (grayscale, RGB, RGBA, palette; 8 and 16 bit, float) with OpenCV
and DICOM with pydicom (see ``tasks.dicom``). Inputs are untrusted: size and decoded bytes are read
from the header before any pixel is allocated, the decoders' own warnings decide whether a file is
truncated or corrupt, and whatever a decoder raises on one file becomes that file's
``ImageDecodeError``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import cv2
import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageDecodeError",
    "decode_image",
    "is_dicom",
    "to_uint8",
]

# File name endings screened and trained on. DICOM files without a suffix are found by their
# preamble (see ``is_dicom``).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
MIN_SIDE = 64
# Large enough for any detector (a 4280x3520 original is 15 MP); far below what would exhaust memory.
MAX_PIXELS = 60_000_000
# Decoded samples one input may need (width x height x samples x bytes per sample, x frames for
# DICOM), checked from the header before any pixel is allocated. The largest real chest X-rays need
# 37 MB (4300x4300 16-bit grayscale DICOM) and 90 MB (4280x3520 16-bit RGB); 256 MiB admits them
# with room to spare, while the decode plus its uint8 conversion (about twice this at worst) stays
# inside a screening worker's memory ceiling (``tasks.sandbox``). Megapixels alone do not bound
# memory: 60 MP of 16-bit RGBA is 480 MB before any conversion.
MAX_DECODED_BYTES = 256 * 1024 * 1024

_SUPPORTED_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF"}
# Leading bytes of the formats we decode: a file that starts like one of them but that Pillow
# cannot open has a damaged header, which is more useful to say than "not an image".
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}

# Decoders are third-party C and Python code parsing hostile bytes: whatever they raise on one
# file becomes that file's reason instead of ending the run. Listed rather than ``Exception`` so
# that a NameError or ImportError in our own code still fails loudly.
DECODER_FAILURES = (
    ArithmeticError, AssertionError, AttributeError, BufferError, EOFError, LookupError, NotImplementedError,
    OSError, RuntimeError, SyntaxError, TypeError, ValueError, struct.error, zlib.error, cv2.error,
)  # fmt: skip


class ImageDecodeError(ValueError):
    """An input that cannot be used as an X-ray; ``reason`` is for the rejected row."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; bare datasets only a suffix."""
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int = MAX_PIXELS,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> np.ndarray:
    """Decode ``data`` to an ``(height, width, 3)`` uint8 RGB array.

    Raises ``ImageDecodeError`` naming ``uri`` and the reason for any input that is not a usable
    image (empty, not an image, truncated or corrupt, too small, too large, blank), and for nothing
    else whatever the bytes: a decoder's own exception becomes the reason.
    """
    if not data:
        raise ImageDecodeError(uri, "empty file")
    try:
        with _quiet_decoders:
            pixels = _decode(data, uri, max_pixels, max_decoded_bytes)
            return _as_rgb(pixels, uri)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(uri, "out of memory while decoding: not decoded") from None
    except DECODER_FAILURES as error:
        raise ImageDecodeError(uri, f"the decoder failed on this file ({error_kind(error)})") from None


def _decode(data: bytes, uri: str, max_pixels: int, max_decoded_bytes: int) -> np.ndarray:
    if is_dicom(data, uri):
        from tasks.dicom import decode_dicom

        return decode_dicom(data, uri, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)
    return _decode_raster(data, uri, max_pixels, max_decoded_bytes)


def error_kind(error: BaseException) -> str:
    """An exception's type for a reason; never its message, which may quote the file's content."""
    kind = type(error)
    package = kind.__module__.split(".")[0]
    return kind.__name__ if package == "builtins" else f"{package}.{kind.__name__}"


def _as_rgb(pixels: np.ndarray, uri: str) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ImageDecodeError(uri, f"unexpected decoded layout {pixels.shape} {pixels.dtype}")
    if int(pixels.min()) == int(pixels.max()):
        raise ImageDecodeError(uri, "blank image: every pixel has the same value")
    return np.ascontiguousarray(pixels)


def check_size(uri: str, width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(uri, f"corrupt header: size {width}x{height}")
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(uri, f"too small: {width}x{height} pixels, need at least {MIN_SIDE} a side")
    if width * height > max_pixels:
        raise ImageDecodeError(
            uri, f"too large: {width}x{height} pixels ({width * height / 1e6:.0f} MP) exceeds {max_pixels / 1e6:.0f} MP"
        )


def check_decoded_bytes(
    uri: str, width: int, height: int, samples: int, bits: int, max_decoded_bytes: int, frames: int = 1
) -> None:
    """Refuse, from header values alone, an image whose decoded samples exceed the budget."""
    needed = width * height * samples * max(1, math.ceil(bits / 8)) * frames
    if needed > max_decoded_bytes:
        what = f"{width}x{height}, {samples} samples of {bits} bits" + (f", {frames} frames" if frames > 1 else "")
        raise ImageDecodeError(
            uri, f"too large to decode: {what} need {_size(needed)}, over the budget of {_size(max_decoded_bytes)}"
        )


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


# --- raster formats ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _RasterHeader:
    image_format: str
    width: int
    height: int
    samples: int  # per pixel, as the decoder will allocate them
    bits: int  # per sample


def _decode_raster(data: bytes, uri: str, max_pixels: int, max_decoded_bytes: int) -> np.ndarray:
    header = _probe(data, uri)
    if header.image_format not in _SUPPORTED_FORMATS:
        raise ImageDecodeError(
            uri, f"unsupported image format {header.image_format} (use PNG, JPEG, BMP, TIFF or DICOM)"
        )
    check_size(uri, header.width, header.height, max_pixels)
    check_decoded_bytes(uri, header.width, header.height, header.samples, header.bits, max_decoded_bytes)
    if header.image_format == "PNG" and (problem := _png_chunk_problem(data)) is not None:
        raise ImageDecodeError(uri, problem)
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR keeps grayscale as one channel and drops alpha;
    # both, unlike IMREAD_UNCHANGED, apply the EXIF orientation.
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    pixels, messages = _with_decoder_messages(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), flags))
    problem = _damage(header.image_format, messages)
    if problem is not None:
        raise ImageDecodeError(uri, problem)
    if pixels is None:
        reason, _ = _with_decoder_messages(lambda: _pillow_diagnosis(data, header.image_format))
        raise ImageDecodeError(uri, reason)
    pixels = to_uint8(pixels, uri)
    if pixels.ndim == 3:  # OpenCV's BGR(A) to RGB, in place: the array is ours
        code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, code, dst=None if pixels.shape[2] == 4 else pixels)
    return pixels


def _probe(data: bytes, uri: str) -> _RasterHeader:
    """Format, size and sample layout from the header alone; Pillow reads no pixels until asked."""
    from PIL import Image, UnidentifiedImageError

    # Pillow's own bomb check fires at open(), before we know the size: ours (check_size) runs
    # right after with a configurable limit and a message that names the size.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
            samples, bits = _sample_layout(image, image_format, data)
            return _RasterHeader(image_format, image.width, image.height, samples, bits)
    except UnidentifiedImageError:
        raise ImageDecodeError(uri, _unidentified_reason(data)) from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error) as error:
        claimed = _claimed_format(data)
        raise ImageDecodeError(
            uri, f"damaged {claimed or 'image'} header ({error_kind(error)} while reading it)"
        ) from None


def _sample_layout(image: Image.Image, image_format: str, data: bytes) -> tuple[int, int]:
    """Samples per pixel and bits per sample as OpenCV will allocate them."""
    if image_format == "PNG":
        # Pillow reports 16-bit colour PNGs as 8-bit modes: the IHDR (validated by open()) does not.
        bit_depth, colour_type = data[24], data[25]
        samples = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour_type, 4)
        return samples, 16 if bit_depth == 16 else 8
    if image_format == "TIFF":
        samples = int(image.tag_v2.get(277, 1))
        bits = image.tag_v2.get(258, (8,))
        bits = max(int(value) for value in bits) if isinstance(bits, tuple) else int(bits)
        return max(samples, 3 if image.mode == "P" else 1), max(bits, 8)
    if image.mode in ("P", "PA"):
        return 3, 8  # a palette is expanded to colour
    return len(image.getbands()), int(getattr(image, "bits", 8))


def _pillow_diagnosis(data: bytes, image_format: str) -> str:
    """Why OpenCV gave up on a file without saying so: Pillow's decoder tells a truncated file from
    a corrupt one (the header was checked, so loading the pixels is within budget)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error) as error:
        if "truncated" in str(error):
            return f"truncated {image_format}: the file ends before the image does"
    return f"corrupt {image_format} data"


def _claimed_format(data: bytes) -> str | None:
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)


def _unidentified_reason(data: bytes) -> str:
    claimed = _claimed_format(data)
    if claimed is None:
        return "not an image: unrecognised file format"
    if claimed == "PNG":
        return _png_header_damage(data)
    return f"damaged {claimed} header: the file starts like a {claimed} but its header cannot be read"


def _png_header_damage(data: bytes) -> str:
    """Pillow checks every chunk's CRC up to the image data and then gives no reason: find which."""
    return _png_chunk_problem(data, checksums=True) or "damaged PNG header: its chunks hold invalid values"


def _png_chunk_problem(data: bytes, checksums: bool = False) -> str | None:
    """What is wrong with the chunk structure, if anything. OpenCV allocates a chunk's declared
    length before reading it (6 KB declaring a 4 GB IDAT cost 4 GB), so lengths are checked
    against the file first; ``checksums`` also checks the CRCs up to the image data, as Pillow does."""
    if data[12:16] != b"IHDR":
        return "damaged PNG header: the first chunk is not IHDR"
    position, in_header = 8, True
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            return f"truncated PNG: a chunk declares {length} bytes, only {len(data) - position - 12} remain in the file"
        in_header = in_header and kind != b"IDAT"
        if checksums and in_header and zlib.crc32(data[position + 4 : end - 4]) != int.from_bytes(data[end - 4 : end]):
            where = "the IHDR chunk" if kind == b"IHDR" else "a chunk before the image data"
            return f"damaged PNG header: {where} fails its checksum"
        if kind == b"IEND":
            return None
        position = end
    return None  # no IEND: libpng tells a truncated file from trailing junk


# libjpeg, libpng and libtiff report damage as lines on stderr (warnings for JPEG, where libjpeg
# pads the missing part with grey and carries on; a CRC error in an ancillary PNG chunk is also only
# a warning): the first phrase found decides the reason. The lines hold chunk names and numbers at
# most, but a reason uses only our own words.
_DAMAGE_PHRASES = {
    "JPEG": (
        ("Premature end of JPEG file", "truncated JPEG: the file ends before the image does"),
        ("premature end of data segment", "truncated JPEG: the image data stops before the image is complete"),
        ("bad Huffman code", "corrupt JPEG data: a bad Huffman code in the image data"),
        ("bad arithmetic code", "corrupt JPEG data: a bad arithmetic code in the image data"),
        ("extraneous bytes before marker", "corrupt JPEG data: stray bytes between segments"),
        ("instead of RST", "corrupt JPEG data: a restart marker is missing"),
        ("Corrupt JPEG data", "corrupt JPEG data"),
        ("Inconsistent progression sequence", "corrupt JPEG data: the progressive scans are incomplete"),
        ("Invalid SOS parameters", "corrupt JPEG data: invalid scan parameters"),
    ),
    "PNG": (
        ("input buffer is incomplete", "truncated PNG: the file ends before the image does"),
        ("Not enough image data", "truncated PNG: the image data ends before the image does"),
        ("libpng error: IHDR", "damaged PNG header"),
        ("CRC error", "corrupt PNG: a chunk fails its checksum"),
        ("libpng error", "corrupt PNG: the compressed image data is damaged"),
    ),
    "TIFF": (
        ("Not enough data at scanline", "truncated TIFF: a strip ends before its rows do"),
        ("Read error on strip", "truncated or corrupt TIFF: a strip cannot be read in full"),
        ("Read error at scanline", "truncated or corrupt TIFF: a strip cannot be read in full"),
        ("TIFF_Error", "corrupt TIFF data"),
    ),
}
# Lines that are the decoders' own: libjpeg, libpng and libtiff directly, or through OpenCV's
# logger. Any other line written during a decode (another thread's) is passed on to stderr.
_DECODER_LINE_MARKS = (
    "JPEG", "JFIF", "Adobe", "progression", "SOS", "scanlines", "libpng", "TIFF", "] global ", "tempfile.tif",
    "Decode: ", "PredictorSetup: ",
)  # fmt: skip

_ALL_PHRASES = tuple(phrase for phrases in _DAMAGE_PHRASES.values() for phrase, _ in phrases)

_T = TypeVar("_T")
_stderr_lock = threading.Lock()


def _damage(image_format: str, messages: str) -> str | None:
    phrases = _DAMAGE_PHRASES.get("JPEG" if image_format == "MPO" else image_format, ())
    return next((reason for phrase, reason in phrases if phrase in messages), None)


def _message_sink() -> BinaryIO:
    # In memory where the platform allows: a full disk must not turn every image into a rejection.
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create("decoder-messages"), "w+b")
    return tempfile.TemporaryFile()


def _is_decoder_line(line: str) -> bool:
    # OpenCV continues a multi-line error with "> "
    return line.startswith("> ") or any(mark in line for mark in _DECODER_LINE_MARKS + _ALL_PHRASES)


def _with_decoder_messages(decode: Callable[[], _T]) -> tuple[_T, str]:
    """Run ``decode`` with the process' stderr (fd 2) captured: libjpeg and libpng write their
    warnings there and nowhere else, and OpenCV offers no hook. Decodes that capture are serialised
    (a lock) so that messages are never attributed to the wrong file; lines from anything else that
    wrote meanwhile are passed on to the real stderr."""
    with _stderr_lock, _message_sink() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            result = decode()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read(1 << 16).decode("utf-8", "replace")
    others = [line for line in text.splitlines(keepends=True) if line.strip() and not _is_decoder_line(line)]
    if others:
        sys.stderr.write("".join(others))
    return result, text


# --- quiet decoding ---------------------------------------------------------------------------


class _QuietDecoders:
    """While any decode runs, warnings are ignored and pydicom's and Pillow's loggers are muted.

    Their warnings and log lines can quote header values (a DICOM patient name, a TIFF
    description), so they must not reach logs. ``warnings.catch_warnings`` swaps process-wide
    state, which concurrent threads would restore under each other: the first decode to start
    enters it and the last to finish leaves it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._catcher: warnings.catch_warnings | None = None
        self._muted: list[logging.Logger] = []

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._catcher = warnings.catch_warnings()
                self._catcher.__enter__()
                warnings.simplefilter("ignore")
                self._muted = _decoder_loggers()
                for logger in self._muted:
                    logger.addFilter(_drop_record)
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._catcher is not None:
                for logger in self._muted:
                    logger.removeFilter(_drop_record)
                self._catcher.__exit__(None, None, None)
                self._catcher = None


def _decoder_loggers() -> list[logging.Logger]:
    """pydicom logs to one logger; Pillow to one per module, and a filter on a parent logger does
    not see its children's records, so each is muted (all plugins imported first, so they exist)."""
    from PIL import Image

    Image.init()
    names = {"pydicom", "PIL"} | {
        name for name in logging.root.manager.loggerDict if name.startswith(("pydicom.", "PIL."))
    }
    return [logging.getLogger(name) for name in sorted(names)]


def _drop_record(record: logging.LogRecord) -> bool:
    return False


_quiet_decoders = _QuietDecoders()


# --- sample scaling ---------------------------------------------------------------------------

_BLOCK_ELEMENTS = 1 << 22  # float work is done this many samples at a time: 32 MB of float64


def to_uint8(pixels: np.ndarray, uri: str = "<bytes>") -> np.ndarray:
    """Scale any sample type to uint8 over the values actually used (16-bit X-rays rarely use all 16).

    8- and 16-bit samples go through a lookup table (no float copy of the image); wider integers
    and floats are scaled a block of rows at a time. Raises ``ImageDecodeError`` for inf or NaN.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        index, stored = lookup_domain(pixels)
        table = scale_table(stored.astype(np.float64), float(pixels.min()), float(pixels.max()))
        return table[index]
    if pixels.dtype.kind not in "iuf":
        raise ImageDecodeError(uri, f"unsupported sample type {pixels.dtype}")
    low, high = float(np.min(pixels)), float(np.max(pixels))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageDecodeError(uri, "non-finite pixel values (inf or NaN)")
    return _scale_blockwise(pixels, low, high)


def lookup_domain(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pixels`` as unsigned table indices, and every possible sample value in index order.

    ``table[index]`` then applies any per-value transform computed once on ``stored`` (at most
    65536 values) instead of on every pixel; signed samples index in two's complement order.
    """
    unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
    stored = np.arange(1 << (8 * pixels.dtype.itemsize), dtype=unsigned).view(pixels.dtype)
    return pixels.view(unsigned), stored


def scale_table(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 lookup table mapping ``values`` linearly from [low, high] to [0, 255]."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _scale_blockwise(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    out = np.empty(pixels.shape, np.uint8)
    if pixels.size == 0:
        return out
    rows = max(1, _BLOCK_ELEMENTS // max(1, pixels.size // pixels.shape[0]))
    for start in range(0, pixels.shape[0], rows):
        block = pixels[start : start + rows].astype(np.float64)
        out[start : start + rows] = scale_table(block, low, high)
    return out
