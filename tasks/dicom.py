"""DICOM to a uint8 image with the display transform a radiologist's viewer would apply.

Modality LUT (rescale slope/intercept), then the VOI LUT or window when the file carries one,
else the values actually present; MONOCHROME1 (white = low) is inverted so bone is always bright.
"""

from __future__ import annotations

import io

import numpy as np

from tasks.images import ImageDecodeError, check_size, to_uint8

__all__ = ["decode_dicom"]

_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"}


def decode_dicom(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """A 2-D uint8 array (grayscale) or an ``(h, w, 3)`` uint8 RGB array from DICOM bytes."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise ImageDecodeError(uri, f"corrupt DICOM: {error}") from None

    if "PixelData" not in dataset:
        kind = getattr(dataset, "SOPClassUID", None)
        what = f" ({kind.name})" if kind is not None and hasattr(kind, "name") else ""
        raise ImageDecodeError(uri, f"DICOM without pixel data{what}: not an image")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(uri, f"multi-frame DICOM ({frames} frames) is not supported: expected one radiograph")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise ImageDecodeError(uri, f"unsupported DICOM photometric interpretation {photometric or '(missing)'}")
    check_size(uri, int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0), max_pixels)

    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as error:
        name = getattr(transfer_syntax, "name", transfer_syntax) or "unknown transfer syntax"
        raise ImageDecodeError(
            uri, f"unsupported DICOM compression ({name}): no installed decoder can read it ({error})"
        ) from None
    except (ValueError, AttributeError, KeyError, EOFError) as error:
        raise ImageDecodeError(uri, f"truncated or corrupt DICOM pixel data: {error}") from None

    if pixels.ndim == 3:  # colour: already RGB after pydicom's colour-space conversion
        return to_uint8(pixels)
    pixels = apply_modality_lut(pixels, dataset)
    pixels = apply_voi_lut(pixels, dataset)
    image = to_uint8(np.asarray(pixels, dtype=np.float32))
    if photometric == "MONOCHROME1":
        image = 255 - image
    return image
