"""Screening's results sent back to a PACS, each object until the PACS has it.

After a run, every screened image that came from a PACS (``dicomweb+`` location, store/dicomweb.py)
gets its DICOM objects (screening/dicom_results.py: the TID 1500 SR, and for a flagged image the
heat map's Secondary Capture), built once from the instance's header (WADO-RS metadata, JSON) and
the row, and kept under ``<results>/delivery-objects/<model version>/<SOP Instance UID>/``. The
delivery's ledger entry is ``<results>/deliveries/<model version>/<SOP Instance UID>.json`` while it
is open (pending or dead); once the destination has taken it, it moves to
``<results>/delivered/<model version>/``, so a night lists and reads what is still to send, not
every delivery ever made:

    {"status": "pending" | "delivered" | "dead", "image_uri", "objects": [names], "attempts",
     "nights", "last_error", "updated_at", "destination"}

A PACS image that is a "duplicate" row (the same instance screened under another location first,
screening/ledger.py ``InstanceClaims``) is delivered with that first row's results.

Each run sends what is pending (tonight's and earlier nights'), with a few tries and backoff
within the run; an entry that failed on ``max_nights`` runs is "dead" and waits for a person
(``cxr-screen deliveries RESULTS --retry``). Rows are published before any of this, and delivery
never changes them: a PACS that is down costs a pending entry, not a result. The objects' UIDs are
derived from the source and the model version, so sending again what a PACS has leaves it one copy.

Images from folders or S3 (DICOM files among them) are not delivered: their headers would have to
be parsed outside the decoder's sandbox.
"""

from __future__ import annotations

import dataclasses
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
from screening import ledger
from screening.dicom_results import DEFAULT_UID_ROOT, FINDINGS, Screening, heat_map_capture, structured_report
from screening.reports import heat_map
from screening.results import DELIVERY_STATUSES, PredictionRow, ResultsLayout
from store import storage
from store.clock import utc_timestamp
from store.loading import RETRIED_NEXT_RUN

__all__ = [
    "MAX_NIGHTS",
    "Delivery",
    "Outcome",
    "Prepared",
    "deliver",
    "delivered_count",
    "entries",
    "image_statuses",
    "prepare",
    "retry_dead",
    "was_delivered",
]

logger = logging.getLogger(__name__)

MAX_NIGHTS = 3  # runs on which an object may fail before it waits for a person
MAX_NAMED_DEAD = 100  # dead entries a run's summary and report name one by one; the CLI lists all
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


def _path(results_uri: str, kind: str, model_version: str, *parts: str) -> str:
    """``<results>/<kind>/<model version>/...``: kind is deliveries (open entries), delivered (closed
    ones) or delivery-objects. A version is a folder name: a forged one must not reach outside."""
    if not is_safe_name(model_version):
        raise ValueError(f"model version {model_version!r} is not a safe name")
    return storage.join(results_uri, kind, model_version, *parts)


def _folder(results_uri: str, model_version: str) -> str:
    return _path(results_uri, "deliveries", model_version)


def _entry_uri(results_uri: str, model_version: str, sop_instance_uid: str) -> str:
    return storage.join(_folder(results_uri, model_version), f"{sop_instance_uid}.json")


def _delivered_uri(results_uri: str, model_version: str, sop_instance_uid: str) -> str:
    return _path(results_uri, "delivered", model_version, f"{sop_instance_uid}.json")


def _objects_folder(results_uri: str, model_version: str, sop_instance_uid: str) -> str:
    return _path(results_uri, "delivery-objects", model_version, sop_instance_uid)


def _object_bytes(results_uri: str, model_version: str, sop_instance_uid: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(_objects_folder(results_uri, model_version, sop_instance_uid), name))
    except storage.NotFound:  # built before the objects moved out of the entries' folder
        return storage.read_bytes(storage.join(_folder(results_uri, model_version), sop_instance_uid, name))


def was_delivered(results_uri: str, model_version: str, sop_instance_uid: str) -> bool:
    """Whether the instance's results went, by its closed entry read back as this code wrote it: an
    empty or planted file there is logged and proves nothing."""
    uri = _delivered_uri(results_uri, model_version, sop_instance_uid)
    try:
        return _read(uri).status == "delivered"
    except storage.NotFound:
        return False
    except (StoredStateError, storage.StorageError) as error:
        logger.error("%s: not taken for delivered (%s)", uri, error)
        return False


def _read(uri: str) -> Delivery:
    """An entry as this code writes it, or StoredStateError: its objects are read and sent by name."""
    record = load_json(storage.read_bytes(uri, max_bytes=64 * 1024), uri)
    try:
        delivery = Delivery(**record)
    except TypeError as error:
        raise StoredStateError(f"{uri}: not a delivery entry ({error})") from None
    if not (delivery.status in DELIVERY_STATUSES and set(delivery.objects) <= set(OBJECT_NAMES)
            and all(type(getattr(delivery, name)) is int and getattr(delivery, name) >= 0 for name in ("attempts", "nights"))
            and uri.rsplit("/", 1)[-1] == f"{delivery.sop_instance_uid}.json"
            and all(isinstance(getattr(delivery, name), str) for name in ("image_uri", "destination", "last_error"))):
        raise StoredStateError(f"{uri}: not a delivery entry this code wrote (status, objects, counts or UID)")
    return delivery


def _write(uri: str, delivery: Delivery) -> None:
    delivery.updated_at = utc_timestamp()
    storage.write_bytes(uri, json.dumps(asdict(delivery), indent=2).encode())


def entries(results_uri: str) -> list[tuple[str, Delivery]]:
    """Every open delivery entry (pending or dead) under ``results_uri``, by model version: (version,
    entry). Delivered ones are only counted (``delivered_count``)."""
    found = []
    for uri in storage.list_files(storage.join(results_uri, "deliveries"), {".json"}, missing_ok=True):
        version = uri.rsplit("/", 2)[-2]
        try:
            found.append((version, _read(uri)))
        except (StoredStateError, storage.StorageError) as error:
            logger.error("%s: left alone (%s)", uri, error)
    return found


def delivered_count(results_uri: str) -> int:
    """How many images' results a destination has taken: a listing, no reads."""
    return sum(1 for _ in storage.list_files(storage.join(results_uri, "delivered"), {".json"}, missing_ok=True))


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


@dataclass
class Prepared:
    """What ``prepare`` did: how many images got new objects, and the SOP Instance UID of every row
    of the run that has a delivery entry (new or earlier), by the row's input."""

    made: int = 0
    instances: dict[str, str] = field(default_factory=dict)
    delivered: set[str] = field(default_factory=set)  # of those, the instances a closed entry says went already


def prepare(results_uri: str, run_id: str, card: ModelCard, destination: str,
            uid_root: str = DEFAULT_UID_ROOT) -> Prepared:
    """Build and keep the objects of this run's PACS images, each with a pending entry. An image
    whose entry exists (an earlier run's, open or delivered) keeps it."""
    from pydicom import Dataset

    from store.dicomweb import read_metadata

    if card.positive_class not in FINDINGS:
        raise ValueError(f"the model's positive class {card.positive_class!r} has no coded finding")
    rows = _run_rows(results_uri, run_id, card)
    prepared = Prepared()
    originals = _Originals(results_uri, card, {row.same_as for row in rows if row.status == "duplicate"})
    for row in rows:
        if row.status not in ("ok", "duplicate") or not row.sop_instance_uid \
                or not storage.capabilities(row.image_uri).dicom_instances:
            continue
        if row.status == "duplicate" and row.reason.endswith(RETRIED_NEXT_RUN):
            continue  # its first row is not published yet: the next run looks again, and prepares it then
        sop = row.sop_instance_uid
        entry = _entry_uri(results_uri, card.version, sop)
        if storage.exists(entry):
            prepared.instances[row.image_uri] = sop
            continue
        if was_delivered(results_uri, card.version, sop):
            prepared.instances[row.image_uri] = sop
            prepared.delivered.add(sop)
            continue
        try:
            screened = originals.of(row) if row.status == "duplicate" else row
            if screened is None:
                continue  # its first row was not a prediction (refused by the scope gate): nothing to send
            objects = _objects(screened, card, Dataset.from_json(read_metadata(row.image_uri)), uid_root)
        except Exception as error:  # noqa: BLE001 - a header pydicom or highdicom cannot take: this image only
            logger.error("The DICOM results of %s could not be built: %s", row.image_uri, error)
            _write(entry, Delivery(sop, row.image_uri, [], destination, status="dead",
                                   last_error=f"could not be built: {str(error)[:400]}"))
            prepared.instances[row.image_uri] = sop
            continue
        folder = _objects_folder(results_uri, card.version, sop)
        for name, dataset in objects.items():
            storage.write_bytes(storage.join(folder, name), _part10(dataset))
        _write(entry, Delivery(sop, row.image_uri, sorted(objects), destination))
        prepared.made += 1
        prepared.instances[row.image_uri] = sop
    return prepared


class _Originals:
    """The row a "duplicate" row's instance was screened as, with its pictures (for the heat map):
    its ledger entry, and its run's part files, read once per run."""

    def __init__(self, results_uri: str, card: ModelCard, wanted: set[str]) -> None:
        self.results_uri, self.card, self.wanted = results_uri, card, wanted
        self.runs: dict[str, dict[str, PredictionRow]] = {}  # of each run, the wanted rows alone

    def of(self, row: PredictionRow) -> PredictionRow | None:
        first = ledger.read_entry(self.results_uri, self.card.version, row.same_as, self.card.classes)
        if first.status != "ok" or first.sop_instance_uid != row.sop_instance_uid:
            return None
        if first.run_id not in self.runs:
            self.runs[first.run_id] = {kept.image_uri: kept for kept in _run_rows(self.results_uri, first.run_id, self.card)
                                       if kept.image_uri in self.wanted}
        pictured = self.runs[first.run_id].get(first.image_uri, first)
        return dataclasses.replace(pictured, image_uri=row.image_uri)


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


@dataclass
class Outcome:
    """What ``deliver`` left: counts of delivered now, pending and dead; the status of every entry
    it saw; and the first MAX_NAMED_DEAD dead entries."""

    counts: Counter
    statuses: dict[tuple[str, str], str] = field(default_factory=dict)  # by (model version, SOP Instance UID)
    dead: list[dict[str, str | int]] = field(default_factory=list)


def deliver(results_uri: str, destination: str, max_nights: int = MAX_NIGHTS,
            sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Send every pending entry's objects to ``destination``. After GIVE_UP_AFTER entries in a row
    that did not go, the rest wait for the next run untouched: a PACS that is down costs minutes,
    not hours."""
    send, failed_in_a_row = _sender(destination), 0
    outcome = Outcome(Counter(delivered=0, pending=0, dead=0))
    for version, delivery in entries(results_uri):
        if delivery.status == "delivered":  # written before delivered entries moved out
            _close(results_uri, version, delivery)
        elif delivery.status == "pending" and failed_in_a_row < GIVE_UP_AFTER:
            failed_in_a_row = 0 if _send(results_uri, version, delivery, send, max_nights, sleep) else failed_in_a_row + 1
            delivery.destination = destination
            if delivery.status == "delivered":
                _close(results_uri, version, delivery)
            else:
                _write(_entry_uri(results_uri, version, delivery.sop_instance_uid), delivery)
            outcome.counts[delivery.status] += 1
        else:
            outcome.counts[delivery.status] += 1
        outcome.statuses[version, delivery.sop_instance_uid] = delivery.status
        if delivery.status == "dead" and len(outcome.dead) < MAX_NAMED_DEAD:
            outcome.dead.append({"model_version": version, "sop_instance_uid": delivery.sop_instance_uid,
                                 "image_uri": delivery.image_uri, "nights": delivery.nights,
                                 "last_error": delivery.last_error})
    return outcome


def _send(results_uri: str, version: str, delivery: Delivery, send: Callable[[list[bytes]], None], max_nights: int,
          sleep: Callable[[float], None]) -> bool:
    """One entry's objects sent, with TRIES tries; ``delivery`` updated. True when they went."""
    if not delivery.objects:  # nothing was built for it (an earlier version's dead entry, revived)
        delivery.status, delivery.last_error = "dead", "no objects to send: it could not be built"
        return False
    error = None
    for attempt in range(TRIES):
        delivery.attempts += 1
        try:
            send([_object_bytes(results_uri, version, delivery.sop_instance_uid, name) for name in delivery.objects])
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
        delivery.status, delivery.last_error = "delivered", ""
        return True
    delivery.nights += 1
    delivery.last_error = str(error)[:500]
    delivery.status = "dead" if delivery.nights >= max_nights else "pending"
    logger.warning("Delivery of %s's results failed (night %d of %d): %s", delivery.sop_instance_uid,
                   delivery.nights, max_nights, delivery.last_error)
    return False


def image_statuses(results_uri: str, model_version: str, prepared: Prepared,
                   statuses: dict[tuple[str, str], str]) -> dict[str, str]:
    """Where each of ``prepared``'s images' results stand, by input: as ``deliver`` left its open
    entry (``Outcome.statuses``), or delivered on an earlier run as ``prepare`` found; otherwise (an
    open entry that could not be read, a delivery that stopped) delivered only if its closed entry
    says so."""
    return {image: statuses.get((model_version, sop)) or (
        "delivered" if sop in prepared.delivered or was_delivered(results_uri, model_version, sop) else "pending")
        for image, sop in prepared.instances.items()}


def _close(results_uri: str, version: str, delivery: Delivery) -> None:
    """A delivered entry out of the open ones: written where delivered ones are, then removed. A
    crash between leaves it in both; the next run sends it again (one copy in the PACS) and closes it."""
    _write(_delivered_uri(results_uri, version, delivery.sop_instance_uid), delivery)
    storage.delete(_entry_uri(results_uri, version, delivery.sop_instance_uid))


def retry_dead(results_uri: str) -> int:
    """Give every dead entry another ``MAX_NIGHTS`` nights; returns how many."""
    revived = 0
    for version, delivery in entries(results_uri):
        if delivery.status == "dead":
            delivery.status, delivery.nights = "pending", 0
            _write(_entry_uri(results_uri, version, delivery.sop_instance_uid), delivery)
            revived += 1
    return revived
