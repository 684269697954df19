"""Decoding real X-rays and every raster variant; broken and hostile files rejected with their reason."""

from __future__ import annotations

import io
import os
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from imaging import decode, decoder_messages
from imaging.decode import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from imaging.limits import MAX_DECODED_BYTES, MAX_PIXELS
from imaging.raster import decode_raster, encode_png
from imaging.sample_scaling import to_uint8
from tests.conftest import CXR, CXR_FULLSIZE, require_shared_data
from tests.dicom_builder import PATIENT_NAME, dicom_bytes, radiograph
from tests.hostile_files import decoder_cases, deflated_dicom, encode, gradient, pil_bytes, textured

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


def _decoded_as_before(data: bytes) -> np.ndarray:
    """The decoder this module replaced (OpenCV, float32 scaling), for real images only."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = np.clip(np.rint((pixels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


@pytest.mark.needs_data
def test_real_images_decode_to_the_same_pixels_as_before():
    require_shared_data(CXR_FULLSIZE)
    paths = _real_images(CXR_FULLSIZE) + _real_images(CXR)[::10]
    for path in paths:
        data = path.read_bytes()
        difference = np.abs(decode_image(data, str(path)).astype(int) - _decoded_as_before(data)).max()
        assert difference <= 1, path


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


def test_encode_png_round_trips_grayscale_and_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    assert encode_png(gray).startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(decode_raster(encode_png(gray), "g.png", MAX_PIXELS, MAX_DECODED_BYTES), gray)
    assert np.array_equal(decode_raster(encode_png(rgb), "c.png", MAX_PIXELS, MAX_DECODED_BYTES), rgb)  # RGB stays RGB
    with pytest.raises(ValueError, match="uint8"):
        encode_png(gray.astype(np.float32))


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


def test_float_tiff_is_scaled_over_its_range():
    values = np.tile(np.linspace(-1.0, 2.0, 128, dtype=np.float32), (96, 1))  # any range, not 0..1
    pixels = decode_image(encode(values, ".tif"), "float.tif")[..., 0]
    assert np.abs(pixels.astype(int) - gradient()).max() <= 1


def test_sixteen_bit_is_scaled_through_a_table_without_a_float_copy():
    raw = np.tile(np.arange(3000, dtype=np.uint16) * 20, (3000, 1))  # 18 MB; float32 would add 36 MB
    tracemalloc.start()
    scaled = to_uint8(raw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert scaled.dtype == np.uint8 and scaled[0, 0] == 0 and scaled[0, -1] == 255
    assert np.abs(scaled[0].astype(int) - np.rint(np.arange(3000) * 255 / 2999)).max() <= 1
    assert peak < scaled.nbytes + 4_000_000


def test_signed_sixteen_bit_keeps_its_order():
    raw = np.linspace(-1000, 3000, 128).round().astype(np.int16)[None, :].repeat(4, axis=0)
    scaled = to_uint8(raw)
    assert scaled[0, 0] == 0 and scaled[0, -1] == 255 and (np.diff(scaled[0].astype(int)) >= 0).all()


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(64, 100))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
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
    "truncated.png": (encode(gradient(), ".png")[:300], "truncated PNG: a chunk declares"),
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
    data = _png_with_header_size(60_000, 60_000)  # 3.6 GP: 10 GB as RGB
    tracemalloc.start()
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, "bomb.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000


def test_a_chunk_length_past_the_end_is_refused_before_opencv_allocates_it():
    import resource

    data = CASES["idat-claims-4gb.png"][0]  # 6 KB; OpenCV 5 allocated 4 GB for it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageDecodeError, match="a chunk declares 4294967295 bytes"):
        decode_image(data, "x.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_the_decoded_size_budget_is_read_from_the_header():
    rgb16 = encode(np.stack([gradient(200, 200, np.uint16, high=60000)] * 3, axis=2), ".png")
    assert decode_image(rgb16, "ok.png").shape == (200, 200, 3)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(rgb16, "x.png", max_decoded_bytes=200_000)
    assert caught.value.reason == (
        "too large to decode: 200x200, 3 samples of 16 bits need 240000 bytes, over the budget of 200000 bytes"
    )
    assert MAX_DECODED_BYTES >= 4280 * 3520 * 3 * 2  # the largest real CXR (16-bit RGB) fits


# --- hostile inputs ---------------------------------------------------------------------------

CASES = {name: (data, reason) for name, data, reason in decoder_cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case_decodes_or_is_rejected_with_its_reason(name):
    data, reason = CASES[name]
    if not reason:
        pixels = decode_image(data, f"s3://incoming/{name}")
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        return
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, f"s3://incoming/{name}")
    assert reason in caught.value.reason
    assert caught.value.uri == f"s3://incoming/{name}"
    for part in PATIENT_NAME.split("^"):
        assert part not in caught.value.reason


def test_hostile_cases_are_small_unique_and_realistically_named():
    cases = decoder_cases()
    names = [name for name, _, _ in cases]
    assert len(names) == len(set(names)) >= 30
    assert all(len(data) < 5_000_000 for _, data, _ in cases)
    assert sum(1 for _, _, reason in cases if not reason) >= 2
    suffixes = {Path(name).suffix for name in names}
    assert suffixes == {".dcm", ".png", ".jpg", ".tif", ""}


def test_decoder_messages_stay_off_stderr_but_other_output_passes(capfd):
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(CASES["half-with-end-marker.jpg"][0], "cut.jpg")
    assert capfd.readouterr().err == ""

    def decode_while_someone_else_writes() -> None:
        os.write(2, b"Corrupt JPEG data: premature end of data segment\n")
        os.write(2, b"a log line from another thread\n")

    decoder_messages.with_decoder_messages(decode_while_someone_else_writes)
    assert capfd.readouterr().err == "a log line from another thread\n"


def test_concurrent_decodes_each_get_their_own_reason():
    names = ["valid-chest.jpg", "half-with-end-marker.jpg", "cut.jpg", "valid-chest.png", "cut.png"] * 6
    outcomes: dict[int, str] = {}

    def decode(index: int, name: str) -> None:
        try:
            decode_image(CASES[name][0], name)
            outcomes[index] = ""
        except ImageDecodeError as error:
            outcomes[index] = error.reason

    threads = [threading.Thread(target=decode, args=(i, name)) for i, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, name in enumerate(names):
        expected = CASES[name][1]
        assert (expected in outcomes[index]) if expected else outcomes[index] == "", name


@pytest.mark.parametrize(
    "failure, reason",
    [
        (MemoryError(), "out of memory while decoding: not decoded"),
        (cv2.error("boom"), "the decoder failed on this file (cv2.error)"),
        (RecursionError(), "the decoder failed on this file (RecursionError)"),
    ],
)
def test_whatever_a_decoder_raises_becomes_a_reason(monkeypatch, failure, reason):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cv2, "imdecode", fail)  # the decoders call OpenCV's module function
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(encode(gradient(), ".png"), "x.png")
    assert caught.value.reason == reason


def _mutations(seed: bytes, rng: np.random.Generator, count: int):
    """Bit flips, truncations and insertions of random bytes, the damage transfers and disks do."""
    for _ in range(count):
        data = bytearray(seed)
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(rng.integers(1, 9)):
                data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del data[rng.integers(len(data)) :]
        else:
            at = int(rng.integers(len(data) + 1))
            data[at:at] = rng.bytes(int(rng.integers(1, 17)))
        yield bytes(data)


def test_fuzzed_files_decode_or_are_rejected_never_anything_else():
    seeds = {
        "fuzz.dcm": dicom_bytes(radiograph()),
        "fuzz-implicit.dcm": dicom_bytes(radiograph(), implicit=True),
        "fuzz-deflated.dcm": deflated_dicom(radiograph()),
        "fuzz.png": encode(textured(96, 128), ".png"),
        "fuzz.jpg": encode(textured(96, 128), ".jpg"),
        "fuzz.tif": encode(gradient(96, 128, np.uint16, high=60000), ".tif"),
    }
    rng = np.random.default_rng(12)
    outcomes = {"decoded": 0, "rejected": 0}
    for name, seed in seeds.items():
        for number, data in enumerate(_mutations(seed, rng, 100)):
            try:
                pixels = decode_image(data, name, max_pixels=4_000_000, max_decoded_bytes=16 << 20)
            except ImageDecodeError:
                outcomes["rejected"] += 1
                continue
            except BaseException as error:  # the contract under test: nothing else may escape
                pytest.fail(f"{name} mutation {number}: {type(error).__name__} escaped the decoder")
            assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8, (name, number)
            outcomes["decoded"] += 1
    assert outcomes["rejected"] > 300 and outcomes["decoded"] > 50  # both paths exercised


def test_reduced_resolution_jpeg_decode_is_close_to_the_full_decode_and_only_for_large_jpegs():
    from imaging.raster import reduction
    from model.preprocessing import Preprocessing, resize
    from store.phantoms import chest_phantom

    spec = Preprocessing(input_size=64)
    phantom = chest_phantom(np.random.default_rng(2), 512)
    jpeg = cv2.imencode(".jpg", phantom, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    full = resize(decode.decode_image(jpeg, "a.jpg"), spec)
    reduced = resize(decode.decode_image(jpeg, "a.jpg", reduce_to=64), spec)
    assert reduction("JPEG", 512, 512, 64) == 8 and reduction("JPEG", 100, 100, 64) == 1
    assert reduction("PNG", 512, 512, 64) == 1 and reduction("JPEG", 512, 512, None) == 1
    assert reduced.shape == full.shape and np.abs(reduced.astype(int) - full).mean() < 2.0
    assert not np.array_equal(reduced, full)  # the shortcut really ran
    png = cv2.imencode(".png", phantom)[1].tobytes()
    assert np.array_equal(decode.decode_image(png, "a.png", reduce_to=64), decode.decode_image(png, "a.png"))
