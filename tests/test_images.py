"""Decoding real X-rays and every raster variant; broken files rejected with their reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.images import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from tests.conftest import CXR, CXR_FULLSIZE, require_shared_data


def gradient(height: int = 96, width: int = 128, dtype=np.uint8, high: int = 255, low: int = 0) -> np.ndarray:
    ramp = np.linspace(low, high, width, dtype=np.float64)
    return np.tile(ramp, (height, 1)).round().astype(dtype)


def encode(pixels: np.ndarray, suffix: str) -> bytes:
    ok, buffer = cv2.imencode(suffix, pixels)
    assert ok
    return buffer.tobytes()


def pil_bytes(image: Image.Image, image_format: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


# --- real data ------------------------------------------------------------------------------


def _real_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


@pytest.mark.needs_data
@pytest.mark.parametrize("folder", [CXR, CXR_FULLSIZE], ids=["cxr", "cxr-fullsize"])
def test_every_shared_image_decodes_to_rgb_uint8(folder):
    require_shared_data(folder)
    paths = _real_images(folder)
    assert len(paths) >= 8
    for path in paths:
        pixels = decode_image(path.read_bytes(), str(path))
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, path
        with Image.open(path) as original:  # the header's size, not a resized or rotated copy
            if original.getexif().get(0x0112, 1) in (1, None):
                assert pixels.shape[:2] == (original.height, original.width), path
        assert pixels.std() > 5, f"{path} decoded to a nearly flat image"


# --- raster variants ------------------------------------------------------------------------


def test_grayscale_png_is_replicated_to_three_equal_channels():
    pixels = decode_image(encode(gradient(), ".png"), "g.png")
    assert pixels.shape == (96, 128, 3)
    assert np.array_equal(pixels[..., 0], gradient()) and np.array_equal(pixels[..., 0], pixels[..., 2])


def test_colour_is_returned_as_rgb_not_bgr():
    bgr = np.zeros((80, 80, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    bgr[0, 0] = 0
    pixels = decode_image(encode(bgr, ".png"), "red.png")
    assert pixels[5, 5].tolist() == [200, 0, 0]


def test_rgba_drops_alpha_and_keeps_colour():
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = np.arange(80, dtype=np.uint8)[None, :]  # blue ramp
    rgba[..., 3] = 10  # nearly transparent: the pixel values must survive anyway
    pixels = decode_image(encode(rgba, ".png"), "rgba.png")
    assert pixels.shape == (80, 80, 3)
    assert np.array_equal(pixels[..., 2], rgba[..., 0])


def test_palette_png():
    image = Image.fromarray(gradient(80, 90)).convert("P")
    pixels = decode_image(pil_bytes(image, "PNG"), "palette.png")
    assert pixels.shape == (80, 90, 3)
    assert abs(int(pixels[0, -1, 0]) - 255) <= 2 and pixels[0, 0, 0] <= 2


def test_16_bit_png_is_rescaled_from_its_real_range_not_truncated():
    raw = gradient(dtype=np.uint16, low=1000, high=5000)  # 12-bit detector data in 16-bit storage
    pixels = decode_image(encode(raw, ".png"), "sixteen.png")[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    expected = np.rint((raw.astype(np.float64) - 1000) * 255 / 4000)
    assert np.abs(pixels - expected).max() <= 1
    # Truncating to the low byte, or shifting by 8 bits, would give something else entirely.
    assert not np.array_equal(pixels, (raw >> 8).astype(np.uint8))


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".jpg"])
def test_other_formats(suffix):
    pixels = decode_image(encode(gradient(), suffix), f"x{suffix}")
    assert pixels.shape == (96, 128, 3)
    assert np.abs(pixels[..., 0].astype(int) - gradient()).max() <= 3


def test_16_bit_tiff():
    raw = gradient(dtype=np.uint16, low=0, high=60000)
    pixels = decode_image(encode(raw, ".tif"), "x.tif")[..., 0]
    assert np.abs(pixels.astype(int) - np.rint(raw / 60000 * 255)).max() <= 1


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(64, 100))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    pixels = decode_image(buffer.getvalue(), "rotated.jpg")
    assert pixels.shape[:2] == (100, 64)


# --- broken inputs --------------------------------------------------------------------------


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims another size (CRC fixed): a decompression bomb."""
    data = bytearray(encode(gradient(), ".png"))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _corrupt_idat() -> bytes:
    data = bytearray(encode(gradient(), ".png"))
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = bytes(20)
    return bytes(data)


BROKEN = {
    "empty.png": (b"", "empty file"),
    "notes.png": (b"this is a radiology report, not an image\n" * 10, "not an image"),
    "random.jpg": (np.random.default_rng(0).bytes(5000), "not an image"),
    "truncated.png": (encode(gradient(), ".png")[:300], "truncated PNG: the file ends before the image does"),
    "truncated.jpg": (encode(gradient(300, 300), ".jpg")[:2000], "truncated JPEG"),
    "corrupt.png": (_corrupt_idat(), "corrupt PNG: the compressed image data is damaged"),
    "tiny.png": (encode(gradient(32, 200), ".png"), "too small: 200x32"),
    "bomb.png": (_png_with_header_size(100_000, 100_000), "too large: 100000x100000"),
    "blank.png": (encode(np.full((100, 100), 7, np.uint8), ".png"), "blank image"),
    "anim.gif": (pil_bytes(Image.fromarray(gradient()), "GIF"), "unsupported image format GIF"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_inputs_are_rejected_with_their_reason(name):
    data, reason = BROKEN[name]
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, f"s3://incoming/{name}")
    assert caught.value.uri == f"s3://incoming/{name}"
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"s3://incoming/{name}: ")


def test_bomb_is_refused_before_any_pixel_is_allocated():
    import tracemalloc

    data = _png_with_header_size(60_000, 60_000)  # 3.6 GP: 10 GB as RGB
    tracemalloc.start()
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, "bomb.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000
