"""Screening's results sent back to a PACS, each object until the PACS has it.

After a run, every screened image that came from a PACS (``dicomweb+`` location, store/dicomweb.py)
gets its DICOM objects (screening/dicom_results.py: the TID 1500 SR, and for a flagged image the
heat map's Secondary Capture), built once from the instance's header (WADO-RS metadata, JSON) and
the row, and kept under ``<results>/deliveries/<model version>/<SOP Instance UID>/``. Beside them
``<SOP Instance UID>.json`` is the delivery's ledger entry:

    {"status": "pending" | "delivered" | "dead", "image_uri", "objects": [names], "attempts",
     "nights", "last_error", "updated_at", "destination"}

Each run sends what is pending (tonight's and earlier nights'), with a few tries and backoff
within the run; an entry that failed on ``max_nights`` runs is "dead" and waits for a person
(``cxr-screen deliveries RESULTS --retry``). Rows are published before any of this, and delivery
never changes them: a PACS that is down costs a pending entry, not a result. The objects' UIDs are
derived from the source and the model version, so sending again what a PACS has leaves it one copy.

Images from folders or S3 (DICOM files among them) are not delivered: their headers would have to
be parsed outside the decoder's sandbox.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from model.bundle import ModelCard, is_safe_name
from model.stored_json import StoredStateError
from model.stored_json import loads as load_json
from screening.dicom_results import DEFAULT_UID_ROOT, FINDINGS, Screening, heat_map_capture, structured_report
from screening.reports import heat_map
from screening.results import PredictionRow, ResultsLayout
from store import storage
from store.clock import utc_timestamp

__all__ = ["MAX_NIGHTS", "Delivery", "deliver", "entries", "prepare", "retry_dead"]

logger = logging.getLogger(__name__)

MAX_NIGHTS = 3  # runs on which an object may fail before it waits for a person
STATUSES = ("pending", "delivered", "dead")
OBJECT_NAMES = ("report.dcm", "heat-map.dcm")
GIVE_UP_AFTER = 3  # entries in a row that the destination did not take: the rest wait for the next run
TRIES = 3  # within a run, with BACKOFF_SECONDS between them
BACKOFF_SECONDS = (1.0, 4.0)
CAPTURE_SIDE = 512  # the heat map's side in the Secondary Capture: the thumbnail's map, legible in a viewer


@dataclass
class Delivery:
    """One image's objects and where they stand."""

    sop_instance_uid: str
    image_uri: str
    objects: list[str]
    destination: str
    status: str = "pending"
    attempts: int = 0
    nights: int = 0
    last_error: str = ""
    updated_at: str = field(default_factory=utc_timestamp)


def _folder(results_uri: str, model_version: str) -> str:
    if not is_safe_name(model_version):
        raise ValueError(f"model version {model_version!r} is not a safe name")
    return storage.join(results_uri, "deliveries", model_version)


def _entry_uri(results_uri: str, model_version: str, sop_instance_uid: str) -> str:
    return storage.join(_folder(results_uri, model_version), f"{sop_instance_uid}.json")


def _read(uri: str) -> Delivery:
    """An entry as this code writes it, or StoredStateError: its objects are read and sent by name."""
    record = load_json(storage.read_bytes(uri, max_bytes=64 * 1024), uri)
    try:
        delivery = Delivery(**record)
    except TypeError as error:
        raise StoredStateError(f"{uri}: not a delivery entry ({error})") from None
    if not (delivery.status in STATUSES and set(delivery.objects) <= set(OBJECT_NAMES)
            and all(type(getattr(delivery, name)) is int and getattr(delivery, name) >= 0 for name in ("attempts", "nights"))
            and uri.rsplit("/", 1)[-1] == f"{delivery.sop_instance_uid}.json"
            and all(isinstance(getattr(delivery, name), str) for name in ("image_uri", "destination", "last_error"))):
        raise StoredStateError(f"{uri}: not a delivery entry this code wrote (status, objects, counts or UID)")
    return delivery


def _write(uri: str, delivery: Delivery) -> None:
    delivery.updated_at = utc_timestamp()
    storage.write_bytes(uri, json.dumps(asdict(delivery), indent=2).encode())


def entries(results_uri: str) -> list[tuple[str, Delivery]]:
    """Every delivery entry under ``results_uri``, by model version: (version, entry)."""
    found = []
    for uri in storage.list_files(storage.join(results_uri, "deliveries"), {".json"}, missing_ok=True):
        version = uri.rsplit("/", 2)[-2]
        try:
            found.append((version, _read(uri)))
        except (StoredStateError, storage.StorageError) as error:
            logger.error("%s: left alone (%s)", uri, error)
    return found


def _heat_map(row: PredictionRow) -> np.ndarray | None:
    """The report's heat map of the row, CAPTURE_SIDE square; None without one."""
    blended = heat_map(row)
    return None if blended is None else cv2.resize(blended, (CAPTURE_SIDE, CAPTURE_SIDE), interpolation=cv2.INTER_CUBIC)


def _run_rows(results_uri: str, run_id: str, card: ModelCard) -> list[PredictionRow]:
    rows = []
    for uri in storage.list_files(ResultsLayout(results_uri).run(run_id).parts, missing_ok=True):
        for line in storage.read_bytes(uri).splitlines():
            if line.strip():
                try:
                    rows.append(PredictionRow.from_record(load_json(line, uri), card.classes))
                except ValueError:
                    continue  # reported by the run's outputs already
    return rows


def prepare(results_uri: str, run_id: str, card: ModelCard, destination: str,
            uid_root: str = DEFAULT_UID_ROOT) -> int:
    """Build and keep the objects of this run's screened PACS images, each with a pending entry;
    returns how many. An image whose entry exists (an earlier run's) keeps it."""
    from pydicom import Dataset

    from store.dicomweb import read_metadata

    if card.positive_class not in FINDINGS:
        raise ValueError(f"the model's positive class {card.positive_class!r} has no coded finding")
    made = 0
    for row in _run_rows(results_uri, run_id, card):
        if row.status != "ok" or not row.sop_instance_uid or not storage.capabilities(row.image_uri).dicom_instances:
            continue
        entry = _entry_uri(results_uri, card.version, row.sop_instance_uid)
        if storage.exists(entry):
            continue
        try:
            objects = _objects(row, card, Dataset.from_json(read_metadata(row.image_uri)), uid_root)
        except Exception as error:  # noqa: BLE001 - a header pydicom or highdicom cannot take: this image only
            logger.error("The DICOM results of %s could not be built: %s", row.image_uri, error)
            _write(entry, Delivery(row.sop_instance_uid, row.image_uri, [], destination, status="dead",
                                   last_error=f"could not be built: {str(error)[:400]}"))
            continue
        folder = storage.join(_folder(results_uri, card.version), row.sop_instance_uid)
        for name, dataset in objects.items():
            storage.write_bytes(storage.join(folder, name), _part10(dataset))
        _write(entry, Delivery(row.sop_instance_uid, row.image_uri, sorted(objects), destination))
        made += 1
    return made


def _objects(row: PredictionRow, card: ModelCard, header, uid_root: str) -> dict:
    if str(header.get("SOPInstanceUID", "")) != row.sop_instance_uid:
        raise ValueError("the PACS's metadata names another instance")
    screening = Screening(card.positive_class, row.probability(card.positive_class), card.threshold, card.version)
    objects = {"report.dcm": structured_report(header, screening, uid_root)}
    picture = _heat_map(row) if row.flagged else None
    if picture is not None:
        objects["heat-map.dcm"] = heat_map_capture(header, picture, screening, uid_root)
    return objects


def _part10(dataset) -> bytes:
    import io

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sender(destination: str) -> Callable[[list[bytes]], None]:
    scheme = destination.partition("://")[0]
    if scheme.startswith("dicomweb+"):
        from store.dicomweb import store_instances

        return lambda objects: store_instances(destination, objects)
    if scheme == "dimse":
        from store.dimse import store_instances as c_store

        return lambda objects: c_store(destination, objects)
    raise storage.LocationError(f"{destination}: deliver to dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS) or "
                                "dimse://AET@HOST:PORT (C-STORE)")


def deliver(results_uri: str, destination: str, max_nights: int = MAX_NIGHTS,
            sleep: Callable[[float], None] = time.sleep) -> Counter:
    """Send every pending entry's objects to ``destination``; returns how many were delivered now,
    and how many are pending and dead after. After GIVE_UP_AFTER entries in a row that did not go,
    the rest wait for the next run untouched: a PACS that is down costs minutes, not hours."""
    send, tally, failed_in_a_row = _sender(destination), Counter(delivered=0, pending=0, dead=0), 0
    for version, delivery in entries(results_uri):
        if delivery.status != "pending" or failed_in_a_row >= GIVE_UP_AFTER:
            if delivery.status != "delivered":
                tally[delivery.status] += 1
            continue
        if not delivery.objects:  # nothing was built for it (an earlier version's dead entry, revived)
            delivery.status, delivery.last_error = "dead", "no objects to send: it could not be built"
            _write(_entry_uri(results_uri, version, delivery.sop_instance_uid), delivery)
            tally["dead"] += 1
            continue
        folder = storage.join(_folder(results_uri, version), delivery.sop_instance_uid)
        error = None
        for attempt in range(TRIES):
            delivery.attempts += 1
            try:
                send([storage.read_bytes(storage.join(folder, name)) for name in delivery.objects])
                error = None
                break
            except storage.LocationError:
                raise
            except Exception as failure:  # noqa: BLE001 - whatever stopped this entry, the others go on
                error = failure
                if isinstance(failure, (storage.Unreadable, storage.AccessDenied)) or attempt == TRIES - 1:
                    break  # refused as it is: another try in this run would be refused the same
                sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
        if error is None:
            delivery.status, delivery.last_error, failed_in_a_row = "delivered", "", 0
        else:
            failed_in_a_row += 1
            delivery.nights += 1
            delivery.last_error = str(error)[:500]
            delivery.status = "dead" if delivery.nights >= max_nights else "pending"
            logger.warning("Delivery of %s's results to %s failed (night %d of %d): %s", delivery.sop_instance_uid,
                           destination, delivery.nights, max_nights, delivery.last_error)
        delivery.destination = destination
        _write(_entry_uri(results_uri, version, delivery.sop_instance_uid), delivery)
        tally[delivery.status] += 1
    return tally


def retry_dead(results_uri: str) -> int:
    """Give every dead entry another ``MAX_NIGHTS`` nights; returns how many."""
    revived = 0
    for version, delivery in entries(results_uri):
        if delivery.status == "dead":
            delivery.status, delivery.nights = "pending", 0
            _write(_entry_uri(results_uri, version, delivery.sop_instance_uid), delivery)
            revived += 1
    return revived
