"""Bytes of an X-ray file to a uint8 RGB array, or one clear error saying why not.

Handles PNG, JPEG, BMP and TIFF (grayscale, RGB, RGBA, palette; 8 and 16 bit, float) with OpenCV
(see ``imaging.raster``) and DICOM with pydicom (see ``imaging.dicom``). Inputs are untrusted: size and
decoded bytes are read from the header before any pixel is allocated, the decoders' own warnings
decide whether a file is truncated or corrupt, and whatever a decoder raises on one file becomes
that file's ``ImageDecodeError``.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from imaging.decoder_messages import quiet_decoders
from imaging.dicom_identity import DicomRejected, Study
from imaging.limits import DECODER_FAILURES, MAX_DECODED_BYTES, MAX_PIXELS, ImageDecodeError, error_kind
from imaging.raster import decode_raster

# ImageDecodeError (imaging.limits) is exported here too: it is what decoding raises.
__all__ = ["IMAGE_SUFFIXES", "ImageDecodeError", "decode_image", "decode_image_and_study", "is_dicom"]

# File name endings screened and trained on. DICOM files without a suffix are found by their
# preamble (see ``is_dicom``).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})



def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; bare datasets only a suffix."""
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int = MAX_PIXELS,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    reduce_to: int | None = None,
    frontal_chest_only: bool = False,
) -> np.ndarray:
    """Decode ``data`` to an ``(height, width, 3)`` uint8 RGB array; with ``reduce_to``, a JPEG at
    least twice that size a side at reduced resolution (a shortcut only used where it passed the
    engine gate, store/engines.py); with ``frontal_chest_only``, a DICOM whose header says it is not
    a frontal chest X-ray is refused (``imaging.dicom_guard``).

    Raises ``ImageDecodeError`` naming ``uri`` and the reason for any input that is not a usable
    image (empty, not an image, truncated or corrupt, too small, too large, blank), and for nothing
    else whatever the bytes: a decoder's own exception becomes the reason.
    """
    return decode_image_and_study(data, uri, max_pixels, max_decoded_bytes, reduce_to, frontal_chest_only)[0]


def decode_image_and_study(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int = MAX_PIXELS,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    reduce_to: int | None = None,
    frontal_chest_only: bool = False,
) -> tuple[np.ndarray, Study | None]:
    """``decode_image``, and the study a DICOM input belongs to (None for other formats). A DICOM
    refused after its header was read raises ``DicomRejected``, which names the study too."""
    if not data:
        raise ImageDecodeError(uri, "empty file")
    try:
        with quiet_decoders:
            pixels, study = _decode(data, uri, max_pixels, max_decoded_bytes, reduce_to, frontal_chest_only)
            return _as_rgb(pixels, uri, study), study
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(uri, "out of memory while decoding: not decoded") from None
    except DECODER_FAILURES as error:
        raise ImageDecodeError(uri, f"the decoder failed on this file ({error_kind(error)})") from None


def _decode(
    data: bytes, uri: str, max_pixels: int, max_decoded_bytes: int, reduce_to: int | None, frontal_chest_only: bool
) -> tuple[np.ndarray, Study | None]:
    if is_dicom(data, uri):
        from imaging.dicom import decode_dicom

        return decode_dicom(data, uri, max_pixels, max_decoded_bytes, frontal_chest_only)
    return decode_raster(data, uri, max_pixels, max_decoded_bytes, reduce_to), None


def _as_rgb(pixels: np.ndarray, uri: str, study: Study | None) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        _refuse(uri, f"unexpected decoded layout {pixels.shape} {pixels.dtype}", study)
    if int(pixels.min()) == int(pixels.max()):
        _refuse(uri, "blank image: every pixel has the same value", study)
    return np.ascontiguousarray(pixels)


def _refuse(uri: str, reason: str, study: Study | None) -> NoReturn:
    raise ImageDecodeError(uri, reason) if study is None else DicomRejected(uri, reason, study)
