"""DICOM written by pydicom in the test: display transforms, compression, and refusals."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tasks.images import ImageDecodeError, decode_image

ROWS, COLUMNS = 80, 100


def ramp(low: int, high: int) -> np.ndarray:
    return np.tile(np.linspace(low, high, COLUMNS), (ROWS, 1)).round().astype(np.uint16)


def dicom_bytes(dataset: Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def radiograph(
    pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2", bits_stored: int = 16
) -> Dataset:
    pixels = ramp(0, 4000) if pixels is None else pixels
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "DX"
    dataset.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    return dataset


def gray(dataset: Dataset, name: str = "x.dcm") -> np.ndarray:
    pixels = decode_image(dicom_bytes(dataset), name)
    assert pixels.shape == (ROWS, COLUMNS, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0].astype(int)


def test_monochrome2_16_bit_uses_its_real_range():
    values = gray(radiograph(ramp(200, 3200), bits_stored=12))
    assert values[0, 0] == 0 and values[0, -1] == 255
    assert abs(values[0, COLUMNS // 2] - 128) <= 2


def test_monochrome1_is_inverted_so_dense_tissue_is_bright():
    normal = gray(radiograph(photometric="MONOCHROME2"))
    inverted = gray(radiograph(photometric="MONOCHROME1"))
    assert np.array_equal(inverted, 255 - normal)
    assert inverted[0, 0] == 255 and inverted[0, -1] == 0


def test_detected_by_preamble_without_suffix_and_by_suffix_without_preamble():
    dataset = radiograph()
    assert gray(dataset, "s3://incoming/IM0001").shape == (ROWS, COLUMNS)
    bare = decode_image(dicom_bytes(dataset, preamble=False), "IM0001.dcm")
    assert bare.shape == (ROWS, COLUMNS, 3)


def test_window_is_applied_in_modality_units_after_rescale():
    # Stored values 0..4000 with intercept -1024: modality values -1024..2976.
    dataset = radiograph(bits_stored=12)
    dataset.RescaleSlope = 1
    dataset.RescaleIntercept = -1024
    dataset.WindowCenter = 0
    dataset.WindowWidth = 400
    values = gray(dataset)
    stored = ramp(0, 4000)[0].astype(float)
    modality = stored - 1024
    below, above = modality < -200, modality > 200
    assert (values[0][below] == 0).all() and (values[0][above] == 255).all()
    inside = ~below & ~above
    linear = ((modality[inside] - (0 - 0.5)) / (400 - 1) + 0.5) * 255  # DICOM PS3.3 C.11.2.1.2
    assert np.abs(values[0][inside] - linear).max() <= 3
    # Ignoring the intercept would put the window on stored values 0..200 only: nearly all white.
    assert (values[0] == 255).mean() < 0.8


def test_voi_lut_sequence_is_applied():
    dataset = radiograph(ramp(0, 255), bits_stored=8)
    lut = np.zeros(256, np.uint16)
    lut[128:] = 4095  # a hard threshold: the LUT, not a ramp, decides the picture
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = lut.astype("<u2").tobytes()
    dataset.VOILUTSequence = Sequence([item])
    values = gray(dataset)
    stored = ramp(0, 255)[0]
    assert (values[0][stored < 128] == 0).all() and (values[0][stored >= 128] == 255).all()


def test_rle_compressed_decodes_like_uncompressed():
    dataset = radiograph()
    expected = gray(dataset)
    dataset.compress(RLELossless)
    assert dataset.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(gray(dataset), expected)


def test_jpeg_baseline_decodes_with_an_installed_handler():
    pixels = ramp(0, 255).astype(np.uint8)
    dataset = radiograph(pixels, bits_stored=8)
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([jpeg.tobytes()])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    assert np.abs(gray(dataset) - pixels.astype(int)).max() <= 3


def test_compression_without_a_decoder_is_rejected_with_the_syntax_named():
    dataset = radiograph(ramp(0, 255).astype(np.uint8), bits_stored=8)
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    with pytest.raises(ImageDecodeError, match="unsupported DICOM compression.*JPEG-LS"):
        decode_image(dicom_bytes(dataset), "ls.dcm")


def test_multi_frame_is_rejected():
    dataset = radiograph(np.stack([ramp(0, 4000)] * 3))
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames\)"):
        decode_image(dicom_bytes(dataset), "cine.dcm")


def test_non_image_dicom_is_rejected():
    dataset = radiograph()
    del dataset.PixelData
    with pytest.raises(ImageDecodeError, match="DICOM without pixel data"):
        decode_image(dicom_bytes(dataset), "report.dcm")


def test_truncated_pixel_data_is_rejected():
    data = dicom_bytes(radiograph())
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_image(data[: len(data) - 5000], "cut.dcm")


def test_oversized_dicom_is_refused_from_its_header():
    dataset = radiograph()
    dataset.Rows, dataset.Columns = 50_000, 50_000  # pixel data unchanged: the header lies
    with pytest.raises(ImageDecodeError, match="too large: 50000x50000"):
        decode_image(dicom_bytes(dataset), "huge.dcm")
