"""DICOM files for the tests, written by pydicom: one builder for the decoder, study, screening and
patient-data tests.

``radiograph()`` makes a data set (a DX radiograph, Explicit VR Little Endian, with a patient name
that must never reach an output); keyword arguments set, remove or replace any element;
``dicom_bytes()`` writes it as a file.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["COLUMNS", "PATIENT_NAME", "ROWS", "dicom_bytes", "radiograph", "ramp"]

ROWS, COLUMNS = 80, 100
# Stands for any header text: it must never reach a reason, a log line or a report.
PATIENT_NAME = "DOE^JANE^HOSTILE"


def ramp(low: int, high: int) -> np.ndarray:
    """ROWS x COLUMNS 16-bit pixels rising from ``low`` on the left to ``high`` on the right."""
    return np.tile(np.linspace(low, high, COLUMNS), (ROWS, 1)).round().astype(np.uint16)


def radiograph(pixels: np.ndarray | None = None, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
               **header: object) -> Dataset:
    """A DX radiograph of ``pixels`` (default: a 0 to 4000 ramp) named PATIENT_NAME.

    ``header`` maps element keywords to values, set after the pixel data: ``TransferSyntaxUID``
    goes into the file meta, ``None`` leaves the element out, bytes are stored raw under the
    dictionary's VR (text in a number field). Values are not validated: some are malformed on purpose.
    """
    pixels = ramp(0, 4000) if pixels is None else pixels
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "DX"
    dataset.PatientName = PATIENT_NAME
    dataset.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    with config.disable_value_validation():  # each element of the header made anew, unchecked
        for keyword, value in header.items():
            if keyword == "TransferSyntaxUID":
                del dataset.file_meta.TransferSyntaxUID
                dataset.file_meta.TransferSyntaxUID = value
                continue
            if keyword in dataset:
                delattr(dataset, keyword)
            if isinstance(value, bytes):  # pydicom would refuse text in a number field
                tag = Tag(keyword)
                dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
            elif value is not None:
                setattr(dataset, keyword, value)
    return dataset


def dicom_bytes(dataset: Dataset, *, preamble: bool = True, implicit: bool = False) -> bytes:
    """The file: with the 128-byte preamble and 'DICM' (or the bare data set), Explicit VR Little
    Endian unless ``implicit``. Implicit VR writes any value under any tag: the reader then takes
    the dictionary's VR, which is how text lands where a number belongs (NumberOfFrames "abc").
    The encoding is named, so a transfer syntax pydicom does not know is written too."""
    if implicit:
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    with config.disable_value_validation():
        dataset.save_as(buffer, enforce_file_format=preamble, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()
