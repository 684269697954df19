"""The screening output contract in one place: where everything lives under a results location,
what one prediction row holds, and what a run's summary says (DESIGN.md, 'Screening outputs').

    <results>/runs/<run id>/predictions.csv, predictions.jsonl, summary.json, report.html
    <results>/runs/<run id>/parts/chunk-NNNNNN.jsonl    rows a chunk claimed (with thumbnails)
    <results>/runs/<run id>/chunks/chunk-NNNNNN.json    inputs a chunk set out to screen
    <results>/ledger/<model version>/<sha256 of the image URI>.json
    <results>/ledger-instances/<model version>/<sha256 of the SOP Instance UID>.json   which input screens a DICOM instance
    <results>/ledger-quarantine/<model version>/<key>-<time>.json   entries that proved nothing
    <results>/ledger-proven/<model version>/<xx>.json    entries proven by a published row, with their stamps
    <results>/open-runs/<run id>.json                   the lease of a live run
    <results>/peeked/<sha256 of the incoming URI>.json  what its files without an image's name are

Nobody else builds these paths. CSV and JSONL columns derive from ``PredictionRow``'s fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from imaging.dicom_identity import (
    ACQUISITION_FIELDS,
    deidentify_key,
    is_accession_number,
    is_study_field,
    is_uid,
    is_view_position,
)
from model.bundle import is_safe_name
from store import storage

__all__ = [
    "DEIDENTIFIED_PREFIX",
    "DELIVERY_STATUSES",
    "MAX_NAMED_DAMAGE",
    "OUTPUT_NAMES",
    "PROBABILITY_BINS",
    "ROW_STATUSES",
    "RUN_STATUSES",
    "PredictionRow",
    "ResultsLayout",
    "RunLayout",
    "RunSummary",
    "entry_key",
    "input_name",
    "probability_column",
]

OUTPUT_NAMES = ("predictions.csv", "predictions.jsonl", "summary.json", "report.html")
# "duplicate": a DICOM instance (SOP Instance UID) another input was screened as; no prediction of its own.
ROW_STATUSES = ("ok", "rejected", "duplicate")
DELIVERY_STATUSES = ("pending", "delivered", "dead")
RUN_STATUSES = ("running", "completed", "failed", "abandoned")
MAX_NAMED_DAMAGE = 100  # damaged files a summary names one by one; it counts all of them
PROBABILITY_BINS = 20  # a summary's histogram of the positive-class probability: equal bins over [0, 1]


def _safe_name(kind: str, name: str) -> str:
    """Run ids and model versions become folder names: a forged lease or card must not reach outside."""
    if not is_safe_name(name):
        raise ValueError(f"{kind} {name!r} is not a safe name (letters, digits, '.', '_', '-'; no '..')")
    return name


DEIDENTIFIED_PREFIX = "deidentified:"


def input_name(uri: str, deidentify: bool) -> str:
    """What rows, the ledger, chunk records, logs, reports and artifacts call an input: its location,
    or with de-identification a keyed token of it (``CXR_DEIDENTIFY_KEY``), since a location such as
    ``PAT123456_DOE_JOHN/ACC998877_<UID>.dcm`` identifies a patient as well as any header does. The
    same input keeps its token at every run of a site; the clear location stays with the decoder."""
    if not deidentify:
        return uri
    digest = hmac.new(deidentify_key(), uri.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return DEIDENTIFIED_PREFIX + digest[:40]


def entry_key(image_uri: str) -> str:
    """The ledger's name for an input. Names that are not valid UTF-8 (possible on Linux) keep their
    raw bytes through surrogateescape instead of failing the run."""
    return hashlib.sha256(image_uri.encode("utf-8", "surrogateescape")).hexdigest()


_PICTURES = ("thumbnail", "cam", "explanation")  # part files only


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


@dataclass(frozen=True)
class RunLayout:
    """The files of one screening run."""

    folder: str
    run_id: str

    @property
    def parts(self) -> str:
        return storage.join(self.folder, "parts")

    @property
    def chunks(self) -> str:
        return storage.join(self.folder, "chunks")

    def part(self, chunk: int) -> str:
        """The rows a chunk claimed, written when the chunk ends, also by failure."""
        return storage.join(self.parts, f"chunk-{chunk:06d}.jsonl")

    def chunk_inputs(self, chunk: int) -> str:
        """The inputs a chunk set out to screen, written before it claims anything: should the
        process die before the part is written, these and the ledger still say which rows it owns."""
        return storage.join(self.chunks, f"chunk-{chunk:06d}.json")

    @property
    def outputs(self) -> dict[str, str]:
        return {name: storage.join(self.folder, name) for name in OUTPUT_NAMES}


@dataclass(frozen=True)
class ResultsLayout:
    """Every location under one results URI."""

    uri: str

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(storage.join(self.uri, "runs", _safe_name("run id", run_id)), run_id)

    def ledger(self, model_version: str) -> str:
        return storage.join(self.uri, "ledger", _safe_name("model version", model_version))

    def ledger_entry(self, model_version: str, image_uri: str) -> str:
        return storage.join(self.ledger(model_version), entry_key(image_uri) + ".json")

    def instance_entry(self, model_version: str, sop_instance_uid: str) -> str:
        """Which input screens the DICOM instance for this version (``ledger.InstanceClaims``)."""
        return storage.join(self.uri, "ledger-instances", _safe_name("model version", model_version),
                            entry_key(sop_instance_uid) + ".json")

    def proofs(self, model_version: str) -> str:
        """Where ledger entries proven by a published row are remembered with their stamps (``ledger._Proofs``)."""
        return storage.join(self.uri, "ledger-proven", _safe_name("model version", model_version))

    def quarantine(self, model_version: str) -> str:
        """Where ledger entries that prove nothing are moved (``ledger.quarantine``), kept for a person."""
        return storage.join(self.uri, "ledger-quarantine", _safe_name("model version", model_version))

    @property
    def leases(self) -> str:
        return storage.join(self.uri, "open-runs")

    def lease(self, run_id: str) -> str:
        return storage.join(self.leases, _safe_name("run id", run_id) + ".json")

    def peeked(self, incoming_uri: str) -> str:
        """What the files under ``incoming_uri`` without an image's name were found to be (DICOM or not
        an image) and their listing stamps then, so that each is peeked into once per content
        (tasks/screen_chunks.py): one file per incoming location."""
        return storage.join(self.uri, "peeked", entry_key(storage.canonical(incoming_uri)) + ".json")


@dataclass
class PredictionRow:
    """One input's outcome. ``to_record`` is its CSV, JSONL and ledger form."""

    image_uri: str
    sha256: str | None
    status: str  # ROW_STATUSES
    reason: str
    model_version: str
    predicted_class: str
    probabilities: dict[str, float | None]  # one column per class, in the card's order
    flagged: bool
    screened_at: str
    run_id: str = ""
    engine: str = ""  # what ran the forward pass (model/inference.py); empty for rejected rows
    # Share of the Grad-CAM map inside the lung-field prior (model/anatomy.py), for explained images.
    cam_lung_share: float | None = None
    # Distance from the training images in the model's features (model/scope.py); above the card's
    # scope threshold the image is refused. Empty where the model has no scope gate or the image
    # was not decoded.
    scope_score: float | None = None
    # Where PACS keeps a DICOM input (imaging/dicom_identity.py), keyed hashes when de-identified; empty
    # for other inputs. Never a patient's name, id or birth date.
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    accession_number: str = ""
    view_position: str = ""  # AP, PA, LL, ... (imaging.dicom_identity.VIEW_TERMS), "other", or empty
    # How a DICOM input was acquired, each a word of imaging.dicom_identity's vocabularies or empty:
    # drift is watched on these (screening/drift.py).
    modality: str = ""
    manufacturer: str = ""
    photometric_interpretation: str = ""
    pixel_spacing: str = ""
    # The decoded image's mean grey level and its standard deviation, over [0, 1]: empty where not decoded.
    image_brightness: float | None = None
    image_contrast: float | None = None
    # A "duplicate" row's original: the input screened as the same DICOM instance (``ledger.InstanceClaims``).
    same_as: str = ""
    # Where this image's DICOM results stood when the run published its rows (screening/delivery.py):
    # DELIVERY_STATUSES, or empty where the run delivers nothing for it. The ledger keeps it empty.
    delivery: str = ""
    # Kept in part files for the report's worklist; never in the CSV, the JSONL or the ledger.
    thumbnail: str | None = field(default=None, metadata={"column": False})  # JPEG, base64
    # Grad-CAM at its own resolution (14x14 at 224 px), 8-bit grayscale PNG, base64: the report colours
    # and lays it over the thumbnail for the rows its worklist shows, and only for those.
    cam: str | None = field(default=None, metadata={"column": False})
    explanation: str | None = field(default=None, metadata={"column": False})  # Grad-CAM overlay, JPEG, base64
    # False for a rejection that may pass (access denied): reported, but not claimed in the ledger.
    final: bool = field(default=True, metadata={"column": False})

    @classmethod
    def columns(cls, classes: list[str]) -> list[str]:
        names = []
        for item in dataclasses.fields(cls):
            if item.name == "probabilities":
                names += [probability_column(c) for c in classes]
            elif item.metadata.get("column", True):
                names.append(item.name)
        return names

    def to_record(self, with_thumbnail: bool = False) -> dict[str, Any]:
        record = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "probabilities":
                record.update({probability_column(c): v for c, v in value.items()})
            elif item.metadata.get("column", True) or (with_thumbnail and value and item.name in _PICTURES):
                record[item.name] = value
        return record

    @classmethod
    def from_record(cls, record: Any, classes: list[str]) -> PredictionRow:
        """A row read back from storage (ledger, part file); ValueError names the first field that is
        not what this code wrote."""
        rules = {**_ROW_RULES, **{probability_column(c): _PROBABILITY for c in classes}}
        _check_record(record, rules, required=_ROW_REQUIRED)
        if record["status"] == "duplicate" and (not record.get("same_as") or record["flagged"] or any(
                record.get(probability_column(c)) is not None for c in classes)):
            raise ValueError("a duplicate names its first row (same_as) and has no prediction or flag of its own")
        known = {item.name for item in dataclasses.fields(cls)} - {"probabilities"}
        return cls(**{k: v for k, v in record.items() if k in known},
                   probabilities={c: record.get(probability_column(c)) for c in classes})

    def probability(self, class_name: str) -> float:
        return self.probabilities.get(class_name) or 0.0


@dataclass
class RunSummary:
    """What a run did: its facts (known to the flow and kept in its lease) and its counts (from
    its rows). ``summary.json``, the report, the artifacts and the CLI all read this."""

    run_id: str
    model_version: str
    model_store_uri: str = ""
    incoming_uri: str = ""
    results_uri: str = ""  # absent from leases and summaries written before it existed
    flow_run_id: str = ""
    status: str = "running"  # running | completed | failed | abandoned
    started_at: str = ""
    finished_at: str | None = None
    seconds: float | None = None
    inputs_found: int | None = None
    already_screened: int | None = None
    to_screen: int | None = None
    claimed_by_other_runs: int = 0
    vanished: int = 0
    engine: str = ""  # the engine(s) that ran the forward pass
    engine_reason: str = ""  # why: what auto measured, which engines the version may use
    recovered_runs: list[str] = field(default_factory=list)
    # Set only on the summary of an abandoned run, by the run that recovered it.
    last_seen_at: str | None = None
    recovered_by: str | None = None
    recovered_at: str | None = None
    # Counts, from the rows.
    classes: list[str] = field(default_factory=list)
    threshold: float | None = None
    screened: int = 0
    ok: int = 0
    rejected: int = 0
    duplicates: int = 0  # rows of instances screened as another input (not counted in ``screened``)
    flagged: int = 0
    predicted: dict[str, int] = field(default_factory=dict)
    images_per_second: float | None = None
    # Drift, from the ok rows (``with_drift``): the share flagged, and how many fell in each of
    # PROBABILITY_BINS equal bins of the positive-class probability over [0, 1] (the last bin holds
    # 1.0). None in summaries written before they existed, and where no row was ok.
    flag_rate: float | None = None
    probability_histogram: list[int] | None = None
    # Drift tested (screening/drift.py): {"alarm", "score", "reference", "tests": [{"name", "statistic",
    # "p_value", "alarm", "samples"}]}, and a bounded sample of this run's profile for the runs after it
    # (model/drift_tests.Profile). None in summaries written before they existed.
    drift: dict[str, Any] | None = None
    drift_profile: dict[str, Any] | None = None
    # Results sent back to a PACS (screening/delivery.py): {"destination", "prepared", "delivered",
    # "pending", "dead", "dead_entries": [the first of them], "error"}; None when the run delivers nothing.
    delivery: dict[str, Any] | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    # Stored state this run found damaged, forged or inconsistent and skipped (or refused) instead of
    # stopping: how many, and the first MAX_NAMED_DAMAGE of them, each "location: what is wrong".
    damaged: int = 0
    damaged_files: list[str] = field(default_factory=list)
    # Set when the model store is used without a signing key (store.registry.unsigned_warning).
    unsigned_warning: str | None = None

    def note_damage(self, problems: list[str]) -> None:
        """Counts ``problems`` (each "location: what is wrong") and names the first ones."""
        self.damaged += len(problems)
        room = MAX_NAMED_DAMAGE - len(self.damaged_files)
        self.damaged_files += [_shown_line(problem) for problem in problems[:max(room, 0)]]

    def tally(self, rows: list[PredictionRow], classes: list[str], threshold: float) -> RunSummary:
        """This summary with its counts taken from ``rows``."""
        ok = [row for row in rows if row.status == "ok"]
        duplicates = sum(row.status == "duplicate" for row in rows)
        return dataclasses.replace(
            self, classes=list(classes), threshold=threshold, screened=len(rows) - duplicates, ok=len(ok),
            rejected=len(rows) - len(ok) - duplicates, duplicates=duplicates, flagged=sum(row.flagged for row in rows),
            predicted=dict(sorted(Counter(row.predicted_class for row in ok).items())),
            images_per_second=round((len(rows) - duplicates) / self.seconds, 3) if self.seconds else None,
        )

    def with_drift(self, rows: list[PredictionRow], positive_class: str) -> RunSummary:
        """This summary with the flag rate and the probability histogram of ``rows``' ok rows."""
        ok = [row for row in rows if row.status == "ok"]
        if not ok:
            return dataclasses.replace(self, flag_rate=None, probability_histogram=None)
        probabilities = [row.probability(positive_class) for row in ok]
        histogram = [0] * PROBABILITY_BINS
        for probability in probabilities:
            histogram[min(max(int(probability * PROBABILITY_BINS), 0), PROBABILITY_BINS - 1)] += 1
        return dataclasses.replace(self, flag_rate=round(sum(row.flagged for row in ok) / len(ok), 6),
                                   probability_histogram=histogram)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RunSummary:
        """Tolerates keys it does not know (a lease or summary written by another version); ValueError
        names the first known one that is not what this code wrote."""
        _check_record(data, _SUMMARY_RULES, required=("run_id", "model_version"))
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# What rows and summaries read back from storage must hold. Each rule: a test, and what it means.
class _Rule(NamedTuple):
    test: Callable[[Any], bool]
    means: str


def _check_record(record: Any, rules: dict[str, _Rule], required: tuple[str, ...]) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"a JSON object was expected, found {type(record).__name__}")
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing")
    for name, rule in rules.items():
        if name in record and not rule.test(record[name]):
            raise ValueError(f"{name} {_shown(record[name])} is not {rule.means}")


def _shown_line(text: str) -> str:
    return text if len(text) <= 400 else text[:397] + "..."


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_dead_list(value: Any) -> bool:
    """A summary's dead deliveries (screening/delivery.Outcome.dead): what the report names."""
    return isinstance(value, list) and all(
        isinstance(item, dict) and all(isinstance(item.get(name), str) for name in
                                       ("model_version", "sop_instance_uid", "image_uri", "last_error"))
        and _COUNT.test(item.get("nights")) for item in value)


def _is_time(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def _optional(rule: _Rule) -> _Rule:
    return _Rule(lambda value: value is None or rule.test(value), rule.means + " or null")


_TEXT = _Rule(lambda value: isinstance(value, str), "a string")
_SAFE = _Rule(is_safe_name, "a safe name (letters, digits, '.', '_', '-')")
_TIME = _Rule(_is_time, "an ISO 8601 time")
_COUNT = _Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0, "a count")
_SECONDS = _Rule(lambda value: _is_number(value) and value >= 0, "a finite number >= 0")
_PROBABILITY = _optional(_Rule(lambda value: _is_number(value) and 0 <= value <= 1, "a number in [0, 1]"))
_BASE64 = _optional(_Rule(lambda value: isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", value)
                          is not None, "base64 text"))

_ROW_REQUIRED = ("image_uri", "sha256", "status", "reason", "model_version", "predicted_class", "flagged",
                 "screened_at")
_ROW_RULES = {
    "image_uri": _Rule(lambda value: isinstance(value, str) and value != "", "a location"),
    "sha256": _optional(_Rule(lambda value: isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)
                              is not None, "a sha256")),
    "status": _Rule(lambda value: value in ROW_STATUSES, f"one of {', '.join(ROW_STATUSES)}"),
    "reason": _TEXT, "model_version": _SAFE, "predicted_class": _TEXT,
    "flagged": _Rule(lambda value: isinstance(value, bool), "true or false"), "screened_at": _TIME,
    "run_id": _Rule(lambda value: value == "" or is_safe_name(value), "a run id"),
    "cam_lung_share": _PROBABILITY, "scope_score": _optional(_SECONDS), "thumbnail": _BASE64, "cam": _BASE64, "explanation": _BASE64,
    "engine": _Rule(lambda value: value == "" or is_safe_name(value), "an engine name"),
    # Absent from rows written before they existed: those read back empty.
    **dict.fromkeys(("study_instance_uid", "series_instance_uid", "sop_instance_uid"),
                    _Rule(lambda value: value == "" or is_uid(value), "a DICOM UID or empty")),
    "accession_number": _Rule(lambda value: value == "" or is_accession_number(value), "an accession number or empty"),
    "view_position": _Rule(lambda value: value == "" or is_view_position(value), "a view position or empty"),
    **{name: _Rule(lambda value, name=name: is_study_field(name, value), f"a {name.replace('_', ' ')} of ours or empty")
       for name in ACQUISITION_FIELDS},
    "image_brightness": _PROBABILITY, "image_contrast": _PROBABILITY, "same_as": _TEXT,
    "delivery": _Rule(lambda value: value == "" or value in DELIVERY_STATUSES, "a delivery status or empty"),
}
_SUMMARY_RULES = {
    "run_id": _SAFE, "model_version": _SAFE, "model_store_uri": _TEXT, "incoming_uri": _TEXT, "results_uri": _TEXT,
    "engine": _TEXT, "engine_reason": _TEXT,
    "flow_run_id": _Rule(lambda value: value == "" or _is_uuid(value), "a flow run id (a UUID)"),
    "status": _Rule(lambda value: value in RUN_STATUSES, f"one of {', '.join(RUN_STATUSES)}"),
    "started_at": _Rule(lambda value: value == "" or _is_time(value), "an ISO 8601 time"),
    "finished_at": _optional(_TIME), "last_seen_at": _optional(_TIME), "recovered_at": _optional(_TIME),
    "recovered_by": _optional(_SAFE), "seconds": _optional(_SECONDS), "images_per_second": _optional(_SECONDS),
    "inputs_found": _optional(_COUNT), "already_screened": _optional(_COUNT), "to_screen": _optional(_COUNT),
    "claimed_by_other_runs": _COUNT, "vanished": _COUNT, "screened": _COUNT, "ok": _COUNT, "rejected": _COUNT,
    "duplicates": _COUNT,
    "flagged": _COUNT, "threshold": _PROBABILITY,
    "recovered_runs": _Rule(lambda value: isinstance(value, list) and all(map(is_safe_name, value)),
                            "a list of run ids"),
    "classes": _Rule(lambda value: isinstance(value, list) and all(isinstance(c, str) for c in value),
                     "a list of class names"),
    "predicted": _Rule(lambda value: isinstance(value, dict) and all(map(_COUNT.test, value.values())),
                       "counts by class"),
    "outputs": _Rule(lambda value: isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
                     "locations by name"),
    "damaged": _COUNT, "unsigned_warning": _optional(_TEXT),
    "damaged_files": _Rule(lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value),
                           "a list of problems"),
    # Absent from summaries written before they existed: those read back as None.
    "flag_rate": _PROBABILITY,
    "drift": _optional(_Rule(lambda value: _is_drift(value), "a drift result (alarm, score, reference, tests)")),
    "drift_profile": _optional(_Rule(lambda value: _is_profile(value), "a drift profile (values, categories)")),
    "delivery": _optional(_Rule(
        lambda value: isinstance(value, dict) and isinstance(value.get("destination"), str)
        and all(_COUNT.test(value.get(name, 0)) for name in ("prepared", "delivered", "pending", "dead"))
        and _is_dead_list(value.get("dead_entries", [])),
        "a delivery tally (destination, counts and dead entries)")),
    "probability_histogram": _optional(_Rule(
        lambda value: isinstance(value, list) and len(value) == PROBABILITY_BINS and all(map(_COUNT.test, value)),
        f"a list of {PROBABILITY_BINS} counts")),
}


def _is_drift(value: Any) -> bool:
    if not isinstance(value, dict) or not {"alarm", "score", "reference", "tests"} <= set(value):
        return False
    tests = value["tests"]
    return (isinstance(value["alarm"], bool) and _is_number(value["score"]) and isinstance(tests, list)
            and (value["reference"] is None or isinstance(value["reference"], dict))
            and all(isinstance(test, dict) and isinstance(test.get("name"), str) and isinstance(test.get("alarm"), bool)
                    and _is_number(test.get("statistic")) and _is_number(test.get("p_value")) for test in tests))


def _is_profile(value: Any) -> bool:
    from model.drift_tests import Profile

    try:
        Profile.from_dict(value)
    except ValueError:
        return False
    return True
