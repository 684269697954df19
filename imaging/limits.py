"""What an input may be before any pixel is decoded, and the one error that says why it is not.

Size and decoded bytes are checked from header values alone (by ``imaging.raster`` and
``imaging.dicom``), so a hostile header is refused before anything is allocated. A reason never
quotes the file: only numbers we parsed and words of our own (``error_kind`` names an exception's
type, never its message).
"""

from __future__ import annotations

import math
import struct
import zlib

import cv2

__all__ = [
    "DECODER_FAILURES",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageDecodeError",
    "check_decoded_bytes",
    "check_size",
    "error_kind",
]

MIN_SIDE = 64
# Large enough for any detector (a 4280x3520 original is 15 MP); far below what would exhaust memory.
MAX_PIXELS = 60_000_000
# Decoded samples one input may need (width x height x samples x bytes per sample, x frames for
# DICOM), checked from the header before any pixel is allocated. The largest real chest X-rays need
# 37 MB (4300x4300 16-bit grayscale DICOM) and 90 MB (4280x3520 16-bit RGB); 256 MiB admits them
# with room to spare, while the decode plus its uint8 conversion (about twice this at worst) stays
# inside a screening worker's memory ceiling (``imaging.sandbox``). Megapixels alone do not bound
# memory: 60 MP of 16-bit RGBA is 480 MB before any conversion.
MAX_DECODED_BYTES = 256 * 1024 * 1024


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


def error_kind(error: BaseException) -> str:
    """An exception's type for a reason; never its message, which may quote the file's content."""
    kind = type(error)
    package = kind.__module__.split(".")[0]
    return kind.__name__ if package == "builtins" else f"{package}.{kind.__name__}"


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
