"""Any sample type to uint8, scaled over the values an image actually uses."""

from __future__ import annotations

import math

import numpy as np

from imaging.limits import ImageDecodeError

__all__ = ["lookup_domain", "scale_table", "to_uint8"]

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
