"""DICOM written by pydicom in the test: display transforms, compression, refusals, hostile headers."""

from __future__ import annotations

import logging
import tracemalloc
import warnings

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from imaging.decode import ImageDecodeError, decode_image
from tests.dicom_builder import COLUMNS, PATIENT_NAME, ROWS, dicom_bytes, radiograph, ramp
from tests.hostile_files import deflate_bomb, deflated_dicom


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


def test_jpeg_ls_decodes_with_the_installed_handler():
    """pyjpegls (which highdicom brings) reads JPEG-LS, lossless: the exact pixels come back."""
    jpeg_ls = pytest.importorskip("jpeg_ls")
    pixels = ramp(0, 255).astype(np.uint8)
    dataset = radiograph(pixels, bits_stored=8)
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([jpeg_ls.encode(pixels).tobytes()])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    assert np.abs(gray(dataset) - pixels.astype(int)).max() <= 1


def test_compression_without_a_decoder_is_rejected_with_the_syntax_named():
    dataset = radiograph(ramp(0, 255).astype(np.uint8), bits_stored=8)
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # process 14: no decoder installed here
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64)])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    with pytest.raises(ImageDecodeError, match=r"unsupported DICOM compression \(JPEG Lossless.*Process 14"):
        decode_image(dicom_bytes(dataset), "lossless.dcm")


def test_multi_frame_is_rejected():
    dataset = radiograph(np.stack([ramp(0, 4000)] * 3))
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames\)"):
        decode_image(dicom_bytes(dataset), "cine.dcm")


def test_compressed_frames_without_number_of_frames_are_rejected():
    pixels = ramp(0, 255).astype(np.uint8)
    dataset = radiograph(pixels, bits_stored=8)
    frame = cv2.imencode(".jpg", pixels)[1].tobytes()
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([frame, frame])  # the offset table lists both
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(dicom_bytes(dataset), "two.dcm")
    assert caught.value.reason == (
        "compressed DICOM pixel data lists 2 frames in its offset table, but NumberOfFrames is absent: "
        "not guessing which frame to show"
    )


def test_non_image_dicom_is_rejected():
    dataset = radiograph()
    del dataset.PixelData
    with pytest.raises(ImageDecodeError, match="DICOM without pixel data"):
        decode_image(dicom_bytes(dataset), "report.dcm")


def test_truncated_pixel_data_is_rejected():
    data = dicom_bytes(radiograph())
    with pytest.raises(ImageDecodeError, match=r"truncated DICOM: element \(7FE0,0010\) declares 16000 bytes"):
        decode_image(data[: len(data) - 5000], "cut.dcm")


def test_oversized_dicom_is_refused_from_its_header():
    dataset = radiograph()
    dataset.Rows, dataset.Columns = 50_000, 50_000  # pixel data unchanged: the header lies
    with pytest.raises(ImageDecodeError, match="too large: 50000x50000"):
        decode_image(dicom_bytes(dataset), "huge.dcm")


# --- hostile headers (the rest are in tests/hostile_files.py) ----------------------------------


def rejected(dataset_or_bytes: Dataset | bytes, name: str = "x.dcm", **limits: int) -> str:
    data = dataset_or_bytes if isinstance(dataset_or_bytes, bytes) else dicom_bytes(dataset_or_bytes)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, name, **limits)
    return caught.value.reason


def test_deflated_decodes_like_uncompressed():
    assert np.array_equal(gray(radiograph()), decode_image(deflated_dicom(radiograph()), "d.dcm")[..., 0])


def test_deflate_bomb_is_refused_in_bounded_steps():
    bomb = deflate_bomb()  # 1.1 MB that inflates to 1.1 GB
    tracemalloc.start()
    reason = rejected(bomb, max_decoded_bytes=8 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert reason == "deflated DICOM inflates to more than 24 MiB: refused before parsing it"
    assert peak < 64_000_000


def test_truncated_deflate_stream_is_named():
    data = deflated_dicom(radiograph())
    assert rejected(data[:-200]) == "truncated deflated DICOM: the compressed data set ends early"


def test_header_text_reaches_no_reason_warning_log_or_stderr(caplog, capfd):
    hostile = [radiograph() for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while the test writes them
        hostile[0].PhotometricInterpretation = PATIENT_NAME
        hostile[1].add_new(0x00280008, "LO", PATIENT_NAME)  # NumberOfFrames, as text (implicit VR below)
        hostile[2].WindowCenter, hostile[2].WindowWidth, hostile[2].VOILUTFunction = 100, 50, PATIENT_NAME
        hostile[3].add_new(0x00281053, "LO", PATIENT_NAME)  # RescaleSlope
        files = [dicom_bytes(dataset, implicit=index in (1, 3)) for index, dataset in enumerate(hostile)]
    capfd.readouterr()
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="pydicom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = [rejected(data) for data in files]
    output = capfd.readouterr()
    said = " ".join([*reasons, caplog.text, output.out, output.err, *(str(w.message) for w in caught)])
    for part in PATIENT_NAME.split("^"):
        assert part not in said
    assert reasons[0] == "unsupported DICOM photometric interpretation (non-standard value)"
    assert reasons[1] == "invalid DICOM NumberOfFrames: not an integer"
    assert reasons[2] == "unsupported DICOM VOI LUT function (non-standard value)"
    assert reasons[3] == "invalid DICOM RescaleSlope: not a number"


def test_decoding_leaves_warning_filters_and_the_pydicom_logger_as_they_were():
    filters, logger_filters = list(warnings.filters), list(logging.getLogger("pydicom").filters)
    gray(radiograph())
    broken = radiograph()
    broken.BitsAllocated = 7
    rejected(broken)
    assert warnings.filters == filters and logging.getLogger("pydicom").filters == logger_filters


def test_unregistered_uids_are_not_echoed():
    dataset = radiograph(TransferSyntaxUID="1.2.826.0.1.3680043.99.1")
    assert rejected(dataset) == "unsupported DICOM transfer syntax (non-standard UID)"
    dataset = radiograph()
    dataset.SOPClassUID = "1.2.826.0.1.3680043.99.2"
    del dataset.PixelData
    assert rejected(dataset) == "DICOM without pixel data: not an image"


def test_signed_pixels_keep_their_order():
    pixels = (ramp(0, 4000).astype(np.int32) - 2000).astype(np.int16)
    dataset = radiograph(pixels)
    assert dataset.PixelRepresentation == 1
    values = gray(dataset)
    assert values[0, 0] == 0 and values[0, -1] == 255 and (np.diff(values[0]) >= 0).all()


def test_rescale_overflowing_to_inf_is_named():
    dataset = radiograph()
    dataset.RescaleSlope, dataset.RescaleIntercept = "1e305", 0
    assert rejected(dataset) == "non-finite pixel values after the DICOM rescale or window"


def test_broken_modality_lut_is_named():
    dataset = radiograph(ramp(0, 255), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new(0x00283006, "OW", bytes(100))
    dataset.ModalityLUTSequence = Sequence([item])
    assert rejected(dataset) == "broken modality LUT: the descriptor says 256 entries, the table holds 50"


def test_palette_colour_is_applied_not_shown_as_grey_indices():
    dataset = radiograph(ramp(0, 255).astype(np.uint8), photometric="PALETTE COLOR", bits_stored=8)
    rising = np.linspace(0, 65535, 256).astype("<u2")
    for channel, table in (("Red", rising), ("Green", rising[::-1]), ("Blue", np.zeros(256, "<u2"))):
        setattr(dataset, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(dataset, f"{channel}PaletteColorLookupTableData", table.tobytes())
    pixels = decode_image(dicom_bytes(dataset), "palette.dcm")
    assert pixels[0, 0].tolist() == [0, 255, 0] and pixels[0, -1].tolist() == [255, 0, 0]


def test_segmented_palette_is_refused():
    dataset = radiograph(ramp(0, 255).astype(np.uint8), photometric="PALETTE COLOR", bits_stored=8)
    dataset.SegmentedRedPaletteColorLookupTableData = bytes(8)
    assert rejected(dataset) == "segmented PALETTE COLOR lookup tables are not supported"


def test_sixteen_bit_display_makes_no_float_copy_of_the_image():
    side = 2000
    pixels = np.tile(np.linspace(0, 4000, side), (side, 1)).round().astype(np.uint16)  # 8 MB
    dataset = radiograph(pixels)
    dataset.RescaleSlope, dataset.RescaleIntercept = 0.5, -100  # float64 in pydicom: 32 MB a copy
    dataset.WindowCenter, dataset.WindowWidth = 900, 1200
    data = dicom_bytes(dataset)
    tracemalloc.start()
    decoded = decode_image(data, "big.dcm")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert decoded.shape == (side, side, 3)
    # The pixel data read, the decoded array, the uint8 image and its RGB copy: about 6 bytes a pixel.
    assert peak < 7 * side * side


def test_pixel_data_that_is_not_bytes_is_refused():
    dataset = radiograph()
    dataset.add_new(0x7FE00010, "SQ", Sequence([Dataset()]))
    assert rejected(dataset) == "corrupt DICOM pixel data element (not a byte string)"
