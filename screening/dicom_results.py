"""What screening gives back to a PACS, as DICOM its viewers already show, for each screened DICOM image:

- a **Comprehensive SR following TID 1500** (Measurement Report): one measurement group for the
  image, with the finding (e.g. COVID-19) coded present or absent at the model's threshold, the
  model's probability and the threshold as measurements, the algorithm (name, model version, the
  AI family code) and the device that observed it; it references the source image by its SOP
  Instance UID, and carries the source's patient and study modules and accession unchanged, so it
  files under the same study;
- for a flagged image, the Grad-CAM overlay as a **Secondary Capture** with "NOT FOR DIAGNOSIS"
  burnt in and in its descriptions, as the vendors label theirs. Not a presentation state: a
  colour heat map needs a Blending presentation state, which few viewers display, while every
  viewer displays a Secondary Capture.

Every UID made here is derived from the source's UIDs, the model version and the object's kind,
under the site's UID root (default ``2.25``, the UUID-derived root): a rerun
makes the same objects (a PACS then keeps one copy), and a new model version makes new ones.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = ["DEFAULT_UID_ROOT", "FINDINGS", "Screening", "derived_uid", "heat_map_capture", "read_report",
           "structured_report"]

DEFAULT_UID_ROOT = "2.25"
MANUFACTURER = "cxr-screen"
ALGORITHM = "cxr-screen VGG16 transfer learning"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
REPORT_SERIES_NUMBER = 9901  # high, so that they sort after the acquired series in a viewer
CAPTURE_SERIES_NUMBER = 9902

# The classes the models are trained on, as SNOMED CT findings; "normal" is no finding.
FINDINGS = {
    "covid": ("840539006", "SCT", "COVID-19"),
    "bacterial": ("53084003", "SCT", "Bacterial pneumonia"),
    "viral": ("75570004", "SCT", "Viral pneumonia"),
}
_UID_ROOT = re.compile(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))*")


@dataclass(frozen=True)
class Screening:
    """One image's result as the SR states it: the class it watches for, its probability and
    the threshold it was flagged at, by which model version."""

    finding: str  # a key of FINDINGS
    probability: float
    threshold: float
    model_version: str

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


def derived_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` that depends only on ``parts``: under 2.25, a name-based UUID's integer;
    under a site's root, as many digits of their SHA-256 as fit in 64 characters."""
    if not _UID_ROOT.fullmatch(root) or len(root) > 40:
        raise ValueError(f"UID root {root!r}: digits separated by dots, no leading zeros, at most 40 characters")
    name = "\x1f".join(parts)
    if root == DEFAULT_UID_ROOT:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"  # a name-based UUID, as ITU-T X.667 asks
    digits = str(int.from_bytes(hashlib.sha256(name.encode()).digest(), "big"))[: 64 - len(root) - 1].lstrip("0")
    return f"{root}.{digits or '1'}"


# Type 2 in the patient and study modules: present in every object, empty when unknown. A source
# that leaves one out still gets a report; the report says it is unknown, as the source did.
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _header(source: Dataset) -> Dataset:
    """The source's header without its pixels, with the patient and study modules' type 2 attributes."""
    header = Dataset()
    header.update({element.tag: element for element in source if element.keyword not in ("PixelData",)})
    for keyword in _PATIENT_AND_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _coded(finding: str):
    from highdicom.sr import CodedConcept

    if finding not in FINDINGS:
        raise ValueError(f"no coded finding for class {finding!r}: one of {', '.join(FINDINGS)}")
    return CodedConcept(*FINDINGS[finding])


def _algorithm(screening: Screening):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=ALGORITHM, version=screening.model_version,
                                   family=codes.DCM.ArtificialIntelligence,
                                   parameters=[f"threshold={screening.threshold:g}"])


def _equipment(screening: Screening):
    from highdicom import ContributingEquipment

    # IHE AI Results: the processing equipment that made the object, by name and version.
    return [ContributingEquipment(manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
                                  manufacturer_model_name=ALGORITHM, software_versions=screening.model_version)]


def structured_report(source: Dataset, screening: Screening, uid_root: str = DEFAULT_UID_ROOT) -> Dataset:
    """The TID 1500 Comprehensive SR of ``screening`` for the image ``source`` (its header is enough)."""
    from highdicom.sr import (
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    source_uid, version = str(source.SOPInstanceUID), screening.model_version
    finding, algorithm = _coded(screening.finding), _algorithm(screening)
    device = ObserverContext(observer_type=codes.DCM.Device,
                             observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                 uid=derived_uid(uid_root, "device", version), name=MANUFACTURER,
                                 manufacturer_name=MANUFACTURER, model_name=ALGORITHM))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(uid_root, source_uid, version, "finding"),
                                               identifier=f"{finding.meaning} screening"),
        finding_type=finding,
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup(str(source.SOPClassUID), source_uid)],
        measurements=[
            Measurement(name=codes.DCM.Probability, value=round(float(screening.probability), 6),
                        unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
            Measurement(name=codes.DCM.ThresholdValue, value=round(float(screening.threshold), 6),
                        unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
        ],
        qualitative_evaluations=[QualitativeEvaluation(
            name=finding, value=codes.SCT.Present if screening.present else codes.SCT.Absent)],
    )
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=codes.SCT.ChestImaging, imaging_measurements=[group],
                               title=codes.DCM.ImagingMeasurementReport)
    study = str(source.StudyInstanceUID)
    return ComprehensiveSR(
        evidence=[_header(source)], content=report,
        series_instance_uid=derived_uid(uid_root, study, version, "report-series"), series_number=REPORT_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid_root, source_uid, version, "report"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=_equipment(screening), manufacturer_model_name=ALGORITHM, software_versions=version,
        series_description=f"AI screening: {finding.meaning} ({NOT_FOR_DIAGNOSIS.lower()})"[:64],
    )


def heat_map_capture(source: Dataset, overlay: np.ndarray, screening: Screening,
                     uid_root: str = DEFAULT_UID_ROOT) -> Dataset:
    """The Grad-CAM ``overlay`` (H x W x 3, uint8 RGB) of a flagged image as a Secondary Capture in
    the source's study, "NOT FOR DIAGNOSIS" burnt into its top-left corner."""
    import cv2
    from highdicom.sc import SCImage

    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"the overlay must be H x W x 3 uint8 RGB, not {overlay.shape} {overlay.dtype}")
    labelled = np.ascontiguousarray(overlay).copy()
    scale = max(labelled.shape[1] / 640, 0.4)
    for colour, thickness in (((0, 0, 0), 4), ((255, 255, 255), 1)):  # white on a dark edge: legible on any map
        cv2.putText(labelled, NOT_FOR_DIAGNOSIS, (int(8 * scale), int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.8 * scale, colour, max(1, int(thickness * scale)), cv2.LINE_AA)
    finding, source_uid, version = _coded(screening.finding), str(source.SOPInstanceUID), screening.model_version
    orientation = tuple(source.get("PatientOrientation") or ()) or ("L", "F")  # the source's, or a frontal chest's
    capture = SCImage.from_ref_dataset(
        ref_dataset=_header(source), pixel_array=labelled, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orientation[:2],
        series_instance_uid=derived_uid(uid_root, str(source.StudyInstanceUID), version, "heat-map-series"),
        series_number=CAPTURE_SERIES_NUMBER, sop_instance_uid=derived_uid(uid_root, source_uid, version, "heat-map"),
        instance_number=1, manufacturer=MANUFACTURER, contributing_equipment=_equipment(screening),
        transfer_syntax_uid="1.2.840.10008.1.2.1", manufacturer_model_name=ALGORITHM, software_versions=version,
        series_description=f"AI heat map: {finding.meaning} ({NOT_FOR_DIAGNOSIS})"[:64],
    )
    capture.ImageComments = (f"{NOT_FOR_DIAGNOSIS}: where the model looked (Grad-CAM), probability "
                             f"{screening.probability:.3f} at threshold {screening.threshold:g}, model {version}")
    capture.Laterality = source.get("Laterality", "")  # type 2C; empty for a chest, which has no side
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = "Grad-CAM overlay of the model's finding"
    return capture


def read_report(report: Dataset) -> dict:
    """What a TID 1500 SR made by ``structured_report`` says: the finding, present or absent, the
    probability, the threshold, the algorithm's version and the source image it refers to."""
    from highdicom.sr import ComprehensiveSR

    parsed = ComprehensiveSR.from_dataset(report)
    (group,) = parsed.content.get_image_measurement_groups()
    measurements = {item.name.meaning: item.value for item in group.get_measurements()}
    findings = {code[2] for code in FINDINGS.values()}
    (evaluation,) = [item for item in group.get_qualitative_evaluations() if item.name.meaning in findings]
    versions = [item.TextValue for item in _items(group)
                if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.AlgorithmVersion.value]
    (source,) = group.get_image_source_items() if hasattr(group, "get_image_source_items") else group.source_images
    return {"finding": evaluation.name.meaning, "present": evaluation.value.value == codes.SCT.Present.value,
            "probability": measurements["Probability"], "threshold": measurements["Threshold Value"],
            "model_version": versions[0] if versions else None,
            "source_sop_instance_uid": source.referenced_sop_instance_uid}


def _items(tree):
    for item in tree:
        yield item
        yield from _items(item.get("ContentSequence", []))
