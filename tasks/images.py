"""Bytes of an X-ray file to a uint8 RGB array, or one clear error saying why not.

Handles PNG, JPEG, BMP and TIFF (grayscale, RGB, RGBA, palette; 8 and 16 bit) with OpenCV and
DICOM with pydicom (see ``tasks.dicom``). Sizes are read from the header before any pixels are
allocated, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
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

_SUPPORTED_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF"}


class ImageDecodeError(ValueError):
    """An input that cannot be used as an X-ray; ``reason`` is for the rejected row."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; bare datasets only a suffix."""
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def decode_image(data: bytes, uri: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to an ``(height, width, 3)`` uint8 RGB array.

    Raises ``ImageDecodeError`` naming ``uri`` and the reason for any input that is not a
    usable image: empty, not an image, truncated or corrupt, too small, too large, blank.
    """
    if not data:
        raise ImageDecodeError(uri, "empty file")
    if is_dicom(data, uri):
        from tasks.dicom import decode_dicom

        pixels = decode_dicom(data, uri, max_pixels=max_pixels)
    else:
        pixels = _decode_raster(data, uri, max_pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
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


def _probe(data: bytes, uri: str) -> tuple[str, int, int]:
    """Format and size from the header alone; Pillow reads no pixels until asked."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Pillow's own bomb check fires at open(), before we know the size: ours (check_size)
        # runs right after with a configurable limit and a message that names the size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "", image.width, image.height
        except UnidentifiedImageError:
            raise ImageDecodeError(uri, "not an image: unrecognised file format") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageDecodeError(uri, f"corrupt header: {error}") from None


def _decode_raster(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    image_format, width, height = _probe(data, uri)
    if image_format not in _SUPPORTED_FORMATS:
        raise ImageDecodeError(uri, f"unsupported image format {image_format} (use PNG, JPEG, BMP, TIFF or DICOM)")
    check_size(uri, width, height, max_pixels)
    if image_format in ("JPEG", "MPO") and not _jpeg_complete(data):
        # libjpeg pads a truncated JPEG with grey and only warns: refuse it here instead.
        raise ImageDecodeError(uri, "truncated JPEG: the file ends before the image does")
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR keeps grayscale as one channel and drops alpha;
    # both, unlike IMREAD_UNCHANGED, apply the EXIF orientation.
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if pixels is None:
        raise ImageDecodeError(uri, f"truncated or corrupt {image_format} data")
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return to_uint8(pixels)


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded data escapes 0xFF, so an end-of-image marker after the last start-of-scan
    # marker exists exactly when the last scan was written to its end.
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale any sample type to uint8 over the values actually used (16-bit X-rays rarely use all 16)."""
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (pixels - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
