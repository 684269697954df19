"""PNG, JPEG, BMP and TIFF bytes to a uint8 array with OpenCV, or the reason they cannot be.

The header is probed with Pillow (which reads no pixels until asked) so that size and decoded bytes
are checked before OpenCV allocates anything, and PNG chunk lengths are checked against the file.
What libjpeg, libpng and libtiff write while decoding decides whether a file is truncated or
corrupt (``imaging.decoder_messages``). ``encode_png`` goes the other way, for the images we write
(phantoms, synthetic datasets).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from imaging.decoder_messages import damage_reason, with_decoder_messages
from imaging.limits import ImageDecodeError, check_decoded_bytes, check_size, error_kind
from imaging.sample_scaling import to_uint8

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["decode_raster", "encode_png"]

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


@dataclass(frozen=True)
class _RasterHeader:
    image_format: str
    width: int
    height: int
    samples: int  # per pixel, as the decoder will allocate them
    bits: int  # per sample


_REDUCED = {(2, True): cv2.IMREAD_REDUCED_COLOR_2, (4, True): cv2.IMREAD_REDUCED_COLOR_4,
            (8, True): cv2.IMREAD_REDUCED_COLOR_8, (2, False): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, False): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, False): cv2.IMREAD_REDUCED_GRAYSCALE_8}


def reduction(image_format: str, width: int, height: int, reduce_to: int | None) -> int:
    """By how much libjpeg may shrink a JPEG while decoding it (its DCT scaling: 1/2, 1/4, 1/8)
    and still leave at least ``reduce_to`` pixels a side; 1 for anything else."""
    if not reduce_to or image_format not in ("JPEG", "MPO"):
        return 1
    return next((factor for factor in (8, 4, 2) if min(width, height) // factor >= reduce_to), 1)


def decode_raster(data: bytes, uri: str, max_pixels: int, max_decoded_bytes: int,
                  reduce_to: int | None = None) -> np.ndarray:
    """A 2-D (grayscale) or ``(h, w, 3)`` RGB uint8 array; ``ImageDecodeError`` for an unusable file.
    ``reduce_to``: a JPEG at least twice that size a side is decoded at reduced resolution."""
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
    factor = reduction(header.image_format, header.width, header.height, reduce_to)
    if factor > 1:
        flags = _REDUCED[factor, header.samples >= 3]
    pixels, messages = with_decoder_messages(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), flags))
    problem = damage_reason(header.image_format, messages)
    if problem is not None:
        raise ImageDecodeError(uri, problem)
    if pixels is None:
        reason, _ = with_decoder_messages(lambda: _pillow_diagnosis(data, header.image_format))
        raise ImageDecodeError(uri, reason)
    pixels = to_uint8(pixels, uri)
    if pixels.ndim == 3:  # OpenCV's BGR(A) to RGB, in place: the array is ours
        code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, code, dst=None if pixels.shape[2] == 4 else pixels)
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    """A 2-D (grayscale) or ``(h, w, 3)`` RGB uint8 array, as ``decode_raster`` returns them, as PNG
    bytes (lossless: they decode to the same array)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"a 2-D or (h, w, 3) uint8 array was expected, got {pixels.dtype} {pixels.shape}")
    ok, png = cv2.imencode(".png", pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.shape} array as PNG")
    return png.tobytes()


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
