"""The screening ledger: exactly one prediction row per input and model version, ever.

An entry (``ResultsLayout.ledger_entry``) is created with create-if-absent once its prediction is
known, so whichever run claims an input first owns its row; any other run (a rerun, a concurrent
run) skips it or drops its own copy. An entry read back is checked (``read_entry``): it must be a
valid row of this input and model version.

The ledger is proof, not a name: an input counts as screened only when its entry reads back valid
and names a run that is still open (its lease) or whose published rows hold it (``screened``).
Anything else (an empty or forged file, a copy from another store) is moved to
``<results>/ledger-quarantine/`` and its input screened again; ``reconcile`` audits a whole store.

A DICOM image is also claimed by its instance (``InstanceClaims``): the same SOP Instance UID
arriving under two locations (a folder export and the PACS) is screened once per model version; the
other location gets a "duplicate" row naming the first.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

from model.bundle import is_safe_name
from model.stored_json import StoredStateError, reason
from model.stored_json import loads as load_json
from screening import leases
from screening.results import PredictionRow, ResultsLayout, entry_key, probability_column
from store import storage
from store.clock import utc_now
from store.loading import RETRIED_NEXT_RUN

__all__ = [
    "MAX_PUBLISHED_BYTES",
    "InstanceClaims",
    "LedgerError",
    "Reconciliation",
    "claim",
    "done_keys",
    "quarantine",
    "read_entry",
    "reconcile",
    "screened",
    "stamped_keys",
]

logger = logging.getLogger(__name__)

READERS = 32  # ledger entries are small GETs: on S3 latency, not bandwidth, is what a read costs
LIVE_AFTER = timedelta(minutes=30)  # a lease renewed within this is a live run's (the screen flow's default)
# A stored file that cannot be read as it is, and will not be on a retry: damage, not a failure.
_DAMAGED_FILE = (storage.Unreadable, storage.AccessDenied, storage.NotAFolder)
MAX_PUBLISHED_BYTES = 4 * 2**30  # a run's predictions.jsonl: a national night is a few hundred MB
MAX_CHUNK_RECORD_BYTES = 64 * 2**20  # a chunk's input names (tasks/screen_chunks.py): thousands of locations
MAX_PROOF_SHARD_BYTES = 64 * 2**20  # ~110 bytes an entry: 600,000 entries a shard, 150 million in all


def done_keys(results_uri: str, model_version: str) -> set[str]:
    """Keys (``results.entry_key``) of the inputs with a ledger entry for this model version: one
    listing, no reads. A name is not proof (``screened`` is)."""
    return set(stamped_keys(results_uri, model_version))


def stamped_keys(results_uri: str, model_version: str) -> dict[str, str | None]:
    """``done_keys`` with each entry's listing stamp (``storage.list_files_stamped``)."""
    folder = ResultsLayout(results_uri).ledger(model_version)  # absent before this version's first run
    return {storage.relative_to(uri, folder)[: -len(".json")]: stamp
            for uri, stamp in storage.list_files_stamped(folder, missing_ok=True) if uri.endswith(".json")}


def claim(results_uri: str, row: PredictionRow) -> bool:
    """Record ``row`` for its input; False when another run recorded that input first."""
    uri = ResultsLayout(results_uri).ledger_entry(row.model_version, row.image_uri)
    return storage.create_if_absent(uri, _entry_bytes(row))


def _entry_bytes(row: PredictionRow) -> bytes:
    return json.dumps(row.to_record(), sort_keys=True).encode()


class LedgerError(ValueError):
    """A ledger entry that is not what this code wrote: its row cannot be trusted or used."""


def read_entry(results_uri: str, model_version: str, image_uri: str, classes: list[str] | None) -> PredictionRow:
    """The row recorded for ``image_uri``; LedgerError, naming the entry, for one that is damaged or
    belongs elsewhere (another input or model version: a copied or forged file). ``classes`` None:
    those the entry's probability columns name (an audit that has no card)."""
    uri = ResultsLayout(results_uri).ledger_entry(model_version, image_uri)
    row = _parse_entry(uri, storage.read_bytes(uri, max_bytes=1 << 20), classes)
    if row.model_version != model_version or row.image_uri != image_uri:
        raise LedgerError(f"{uri}: records {row.image_uri!r} for model {row.model_version}, not {image_uri!r} "
                          f"for model {model_version}")
    return row


def _parse_entry(uri: str, data: bytes, classes: list[str] | None) -> PredictionRow:
    try:
        record = load_json(data, uri)
        return PredictionRow.from_record(record, _classes_named(record) if classes is None else classes)
    except ValueError as error:  # bounds, JSON and schema alike
        raise LedgerError(f"{uri}: not a ledger entry: {reason(error, uri)}") from error


def _classes_named(record: object) -> list[str]:
    """The classes a stored row's probability columns name: for an audit that has no card."""
    prefix = probability_column("")
    return [name[len(prefix):] for name in record if name.startswith(prefix)] if isinstance(record, dict) else []


@dataclass
class _PublishedRows:
    """Which inputs each run's published predictions hold, read once per run and kept: many
    entries name the same run."""

    results_uri: str
    open_runs: set[str]  # runs whose lease reads back valid and fresh: a lease file's name proves nothing
    problems: list[str] = field(default_factory=list)
    _rows: dict[str, set[str] | None] = field(default_factory=dict)
    _reading: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Keep what published runs hold for the process's later chunks (``_SHARED_HELD``): a published
    # run's predictions are never written again.
    shared: bool = False

    @classmethod
    def of(cls, results_uri: str, live_after: timedelta, shared: bool = False) -> _PublishedRows:
        return cls(results_uri, leases.live_runs(results_uri, live_after), shared=shared)

    def why_not_held(self, row: PredictionRow, open_runs_hold: bool = True) -> str | None:
        """None when ``row``'s run is open (with ``open_runs_hold``) or its published rows hold
        ``row``; else why not."""
        if open_runs_hold and row.run_id in self.open_runs:
            return None
        if not row.run_id:
            return "it names no run"
        held = self._held(row.run_id)
        if held is None:
            return f"it names run {row.run_id}, which is neither open nor published"
        return None if row.image_uri in held else f"run {row.run_id}'s published predictions have no row for it"

    def _held(self, run_id: str) -> set[str] | None:
        """One read per run, however many reader threads ask for it at once (a run's predictions can
        be hundreds of MB)."""
        with self._lock:
            reading = self._reading.get(run_id)
            mine = reading is None
            if mine:
                reading = self._reading[run_id] = threading.Event()
        if mine:
            try:
                self._rows[run_id] = self._read_shared(run_id) if self.shared else self._read(run_id)
            finally:
                reading.set()
        else:
            reading.wait()
        return self._rows.get(run_id)

    def _read_shared(self, run_id: str) -> set[str] | None:
        key = (self.results_uri, run_id)
        with _SHARED_LOCK:
            if key in _SHARED_HELD:
                _SHARED_HELD.move_to_end(key)
                return _SHARED_HELD[key]
        held = self._read(run_id)
        if held is not None:
            with _SHARED_LOCK:
                _SHARED_HELD[key] = held
                while len(_SHARED_HELD) > _SHARED_HELD_RUNS:
                    _SHARED_HELD.popitem(last=False)
        return held

    def _read(self, run_id: str) -> set[str] | None:
        try:
            outputs = ResultsLayout(self.results_uri).run(run_id).outputs
        except ValueError:
            return None  # not a safe run id: no such run
        uri = outputs["predictions.jsonl"]
        try:
            data = storage.read_bytes(uri, max_bytes=MAX_PUBLISHED_BYTES)
        except storage.NotFound:
            return None
        except _DAMAGED_FILE as error:
            self.problems.append(f"{error} (a published run's predictions cannot be read)")
            return None
        held = set()
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = load_json(line, f"{uri}, line {number}")
                image_uri = record.get("image_uri") if isinstance(record, dict) else None
                if not isinstance(image_uri, str) or record.get("run_id") != run_id:
                    raise StoredStateError(f"{uri}, line {number}: not a row of run {run_id}")
            except StoredStateError as error:
                self.problems.append(str(error))
                continue
            held.add(image_uri)
        return held


def screened(results_uri: str, model_version: str, inputs: Iterable[str], classes: list[str],
             live_after: timedelta = LIVE_AFTER,
             stamps: dict[str, str | None] | None = None) -> tuple[set[str], dict[str, str]]:
    """Of ``inputs`` (whose entries ``done_keys`` listed), those proven screened, and for each of
    the others why not ({input: "entry location: problem"}). A run is open when its lease was
    renewed within ``live_after``.

    An entry is read (``READERS`` at a time, and each run's published predictions once) unless
    ``stamps`` (``stamped_keys``) gives it the stamp it had when an earlier night proved it by a
    published row (``_Proofs``): its bytes are those that were proven, and a published run is
    never written again. Proofs by an open run are not kept: that run may yet die unpublished."""
    layout = ResultsLayout(results_uri)
    published = _PublishedRows.of(results_uri, live_after)
    inputs = list(inputs)
    keys = {uri: entry_key(uri) for uri in inputs}
    proofs = _Proofs(layout.proofs(model_version))
    remembered = proofs.load({keys[uri] for uri in inputs}) if stamps is not None else {}
    newly: dict[str, str] = {}

    def check(image_uri: str) -> str | None:
        stamp = (stamps or {}).get(keys[image_uri])
        if stamp is not None and remembered.get(keys[image_uri]) == stamp:
            return None
        try:
            row = read_entry(results_uri, model_version, image_uri, classes)
        except storage.NotFound:
            return f"{layout.ledger_entry(model_version, image_uri)}: gone while read"
        except (LedgerError, *_DAMAGED_FILE) as error:  # each names the entry
            return str(error)
        why = published.why_not_held(row)
        if why is None and stamp is not None and row.run_id not in published.open_runs:
            newly[keys[image_uri]] = stamp
        return None if why is None else f"{layout.ledger_entry(model_version, image_uri)}: {why}"

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        found = list(pool.map(check, inputs))
    for problem in published.problems:
        logger.warning("%s", problem)
    if newly:
        proofs.save(newly)
    proven = {uri for uri, problem in zip(inputs, found, strict=True) if problem is None}
    return proven, {uri: problem for uri, problem in zip(inputs, found, strict=True) if problem is not None}


class _Proofs:
    """Ledger entries proven by a published row, each with the listing stamp it had then, in 256
    shards by the key's first two hex digits (``<results>/ledger-proven/<version>/<xx>.json``): a
    night reads a few hundred small objects instead of one per already-screened input, and writes
    only the shards it added to. A forged or damaged shard is logged and ignored (its entries are
    read again): it can no more hide an image than a forged run folder could."""

    FORMAT = 1

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.shards: dict[str, dict[str, str]] = {}

    def _uri(self, shard: str) -> str:
        return storage.join(self.folder, f"{shard}.json")

    def load(self, keys: set[str]) -> dict[str, str]:
        wanted = sorted({key[:2] for key in keys})
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            self.shards = dict(zip(wanted, pool.map(self._read, wanted), strict=True))
        return {key: stamp for shard in self.shards.values() for key, stamp in shard.items()}

    def _read(self, shard: str) -> dict[str, str]:
        uri = self._uri(shard)
        try:
            record = load_json(storage.read_bytes(uri, max_bytes=MAX_PROOF_SHARD_BYTES), uri,
                               max_bytes=MAX_PROOF_SHARD_BYTES)
            if not isinstance(record, dict) or record.get("format") != self.FORMAT \
                    or not isinstance(record.get("proven"), dict):
                raise StoredStateError(f"{uri}: not a shard of ledger proofs of format {self.FORMAT}")
        except storage.NotFound:
            return {}
        except (StoredStateError, *_DAMAGED_FILE) as error:
            logger.warning("%s (its entries are read again)", error)
            return {}
        return {key: stamp for key, stamp in record["proven"].items()
                if isinstance(key, str) and key[:2] == shard and isinstance(stamp, str)}

    def save(self, newly: dict[str, str]) -> None:
        """Adds ``newly`` to the shards it falls in. Two runs at once: the last write wins, and what
        the other proved is read again, once. A failed write only costs reads."""
        touched = sorted({key[:2] for key in newly})
        for key, stamp in newly.items():
            self.shards.setdefault(key[:2], {})[key] = stamp

        def write(shard: str) -> None:
            data = json.dumps({"format": self.FORMAT, "proven": self.shards[shard]}, separators=(",", ":")).encode()
            if len(data) <= MAX_PROOF_SHARD_BYTES:  # beyond it the next night reads those entries instead
                storage.write_bytes(self._uri(shard), data)

        try:
            with ThreadPoolExecutor(max_workers=READERS) as pool:
                list(pool.map(write, touched))
        except OSError as error:
            logger.warning("Ledger proofs not kept (the next night reads those entries again): %s", error)


def quarantine(results_uri: str, model_version: str, image_uri: str) -> str:
    """Moves the entry of ``image_uri`` aside (kept for an operator, never lost) so that the input
    can be claimed and screened again; returns where it went."""
    layout = ResultsLayout(results_uri)
    return _move_aside(layout.ledger_entry(model_version, image_uri), layout.quarantine(model_version),
                       entry_key(image_uri))


def _move_aside(uri: str, folder: str, name: str) -> str:
    stamp = utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
    kept = storage.join(folder, f"{name}-{stamp}.json")
    try:
        storage.write_bytes(kept, storage.read_bytes(uri, max_bytes=1 << 20))
    except storage.NotFound:
        return kept  # moved by a concurrent run already
    except _DAMAGED_FILE:  # larger than any entry, or not a file: its name is kept, not its bytes
        storage.write_bytes(kept, b"")
    storage.delete(uri)
    return kept


class Owner(NamedTuple):
    """The input a DICOM instance was screened as, the run that screened it, and whether that is
    final: its row published (a duplicate of it is final too), or only claimed by a run still open
    (a duplicate of it is tried again next run, when the first row is published or proven lost)."""

    image_uri: str
    run_id: str
    final: bool


_SHARED_HELD: collections.OrderedDict[tuple[str, str], set[str]] = collections.OrderedDict()
_SHARED_HELD_RUNS = 4  # published runs whose inputs a process keeps: a repeated export names the same few
_SHARED_LOCK = threading.Lock()


class InstanceClaims:
    """Which input screens each DICOM instance for a model version: the first to claim its SOP
    Instance UID (``ResultsLayout.instance_entry``, create-if-absent), once the image has decoded
    and before the model sees it, so the same image under a second location costs a read, not a
    forward pass, a second row in the worklist or a second result in the PACS.

    The claim keeps a fingerprint of the decoded pixels: an input with the same UID and other
    pixels (a UID reused by a faulty anonymiser, or a planted file) is screened on its own, never
    given another image's result. A claim proves nothing by itself, like a ledger entry: it holds
    while the run that made it is open and its chunk records list the input, or while the input's
    ledger entry reads back valid for the same instance and is held by a published run. Any other
    claim (forged, damaged, or left by a run that died before its row) is moved to the quarantine
    and the instance claimed again; one that cannot be read or moved is logged and the image
    screened. Safe from many threads of one chunk."""

    def __init__(self, results_uri: str, model_version: str, run_id: str, classes: list[str],
                 live_after: timedelta = LIVE_AFTER) -> None:
        self.results_uri, self.model_version, self.run_id, self.classes = results_uri, model_version, run_id, classes
        self.live_after = live_after
        self._published: _PublishedRows | None = None
        self.layout = ResultsLayout(results_uri)
        self._chunk_inputs: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    @property
    def published(self) -> _PublishedRows:
        """The live runs and published rows, read when a claim first needs proving: a chunk of new
        instances (or of no DICOM at all) reads no lease."""
        with self._lock:
            if self._published is None:
                self._published = _PublishedRows.of(self.results_uri, self.live_after, shared=True)
            return self._published

    def screened_as(self, sop_instance_uid: str, image_uri: str, pixels: str) -> Owner | None:
        """None when ``image_uri`` (whose decoded pixels' fingerprint is ``pixels``) is the input
        that screens this instance, now or already, or must be screened anyway; otherwise the input
        that does."""
        uri = self.layout.instance_entry(self.model_version, sop_instance_uid)
        claim = json.dumps({"sop_instance_uid": sop_instance_uid, "image_uri": image_uri, "run_id": self.run_id,
                            "pixels": pixels}, sort_keys=True).encode()
        try:
            for _ in range(2):  # a second time after moving an unproven claim aside
                if storage.create_if_absent(uri, claim):
                    return None
                try:
                    owner, theirs = self._read(uri, sop_instance_uid)
                except storage.NotFound:
                    continue  # moved aside by another run meanwhile
                except (StoredStateError, *_DAMAGED_FILE) as error:
                    problem = str(error)
                else:
                    if owner.image_uri == image_uri:
                        return None  # this input's own claim, from an attempt that died before its row
                    if theirs != pixels:
                        logger.warning("%s has the SOP Instance UID %s of %s, and other pixels: screened on its own",
                                       image_uri, sop_instance_uid, owner.image_uri)
                        return None
                    proven = self._proven(owner, sop_instance_uid)
                    if isinstance(proven, Owner):
                        return proven
                    problem = f"{uri}: {proven}"
                kept = _move_aside(uri, self.layout.quarantine(self.model_version),
                                   f"instance-{entry_key(sop_instance_uid)}")
                logger.error("%s; moved to %s and claimed again", problem, kept)
        except storage.StorageError as error:  # a claim that cannot be read or moved: never a reason not to screen
            logger.error("%s; %s is screened", error, image_uri)
        return None  # claims keep changing under us: screening twice beats not screening

    @staticmethod
    def _read(uri: str, sop_instance_uid: str) -> tuple[Owner, str]:
        record = load_json(storage.read_bytes(uri, max_bytes=64 * 1024), uri)
        if not (isinstance(record, dict) and record.get("sop_instance_uid") == sop_instance_uid
                and isinstance(record.get("image_uri"), str) and record["image_uri"]
                and isinstance(record.get("pixels"), str)
                and isinstance(record.get("run_id"), str) and is_safe_name(record["run_id"])):
            raise StoredStateError(f"{uri}: not a claim of instance {sop_instance_uid} this code wrote")
        return Owner(record["image_uri"], record["run_id"], final=False), record["pixels"]

    def _proven(self, owner: Owner, sop_instance_uid: str) -> Owner | str:
        """``owner``, final or not, when its claim is proven; otherwise why not."""
        problem = self._row_problem(owner, sop_instance_uid)
        if problem is None:
            return owner._replace(final=True)
        if owner.run_id not in self.published.open_runs \
                and owner.run_id in leases.live_runs(self.results_uri, self.live_after):
            self.published.open_runs.add(owner.run_id)  # a run that started after this chunk
        if owner.run_id not in self.published.open_runs:
            return problem
        if self._listed_by(owner.run_id, owner.image_uri):
            return owner
        return f"it names {owner.image_uri!r} and run {owner.run_id}, which is open and never set out to screen it"

    def _row_problem(self, owner: Owner, sop_instance_uid: str) -> str | None:
        try:
            row = read_entry(self.results_uri, self.model_version, owner.image_uri, self.classes)
        except storage.NotFound:
            return f"it names {owner.image_uri!r}, which has no ledger entry"
        except (LedgerError, *_DAMAGED_FILE) as error:
            return str(error)
        if row.sop_instance_uid != sop_instance_uid:
            return f"it names {owner.image_uri!r}, whose row is of another instance"
        if row.status == "duplicate":
            return f"it names {owner.image_uri!r}, itself a duplicate"
        return self.published.why_not_held(row, open_runs_hold=False)

    def _listed_by(self, run_id: str, image_uri: str) -> bool:
        """Whether an open run's chunk records (written before a chunk claims anything) list the
        input: a claim naming a live run proves nothing else. Read again once on a miss, since the
        run may have started chunks since."""
        for again in (False, True):
            with self._lock:
                known = self._chunk_inputs.get(run_id)
            if known is not None and (image_uri in known or again):
                return image_uri in known
            known = set()
            try:
                chunks = ResultsLayout(self.results_uri).run(run_id).chunks
                for uri in storage.list_files(chunks, {".json"}, missing_ok=True):
                    names = load_json(storage.read_bytes(uri, max_bytes=MAX_CHUNK_RECORD_BYTES), uri,
                                      max_bytes=MAX_CHUNK_RECORD_BYTES)
                    known |= {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()
            except (ValueError, *_DAMAGED_FILE) as error:
                logger.warning("%s (the chunk records of run %s)", error, run_id)
            with self._lock:
                self._chunk_inputs[run_id] = known
        return image_uri in known


@dataclass
class Reconciliation:
    """What ``reconcile`` found: one line per problem, grouped."""

    entries: int = 0
    published_rows: int = 0
    damaged: list[str] = field(default_factory=list)  # entries that do not read back as rows
    orphans: list[str] = field(default_factory=list)  # valid entries no open run or published row backs
    missing: list[str] = field(default_factory=list)  # published rows without their entry

    @property
    def clean(self) -> bool:
        return not (self.damaged or self.orphans or self.missing)


def reconcile(results_uri: str, progress: Callable[[int, int], None] = lambda done, total: None,
              live_after: timedelta = LIVE_AFTER) -> Reconciliation:
    """Audits the ledger under ``results_uri`` against the published runs: entries that are damaged,
    entries whose run neither is open nor publishes their row, duplicates whose first row is not in
    the ledger as the same instance screened, and published (claimed) rows whose entry is missing or
    names another run."""
    layout = ResultsLayout(results_uri)
    found = Reconciliation()
    published = _PublishedRows.of(results_uri, live_after)
    ledger_root = storage.join(results_uri, "ledger")
    entries = [(storage.relative_to(folder, ledger_root), uri)
               for folder in storage.list_folders(ledger_root, missing_ok=True)
               for uri in storage.list_files(folder, {".json"}, missing_ok=True)]
    found.entries = len(entries)
    owners: dict[tuple[str, str], str] = {}  # (model version, input) -> the run its entry names
    screened_as: dict[tuple[str, str], tuple[str, str]] = {}  # (model version, input) -> (SOP UID, status)
    duplicates: list[tuple[str, PredictionRow]] = []

    def read(item: tuple[str, str]) -> PredictionRow | str:
        version, uri = item
        try:
            row = _parse_entry(uri, storage.read_bytes(uri, max_bytes=1 << 20), None)
        except (LedgerError, storage.NotFound, *_DAMAGED_FILE) as error:  # each names the entry
            return str(error)
        if not is_safe_name(version) or layout.ledger_entry(version, row.image_uri) != uri:
            return f"{uri}: records {row.image_uri!r} for model {row.model_version}, which is not this entry's name"
        return row

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        for number, (item, result) in enumerate(zip(entries, pool.map(read, entries), strict=True), start=1):
            progress(number, len(entries))
            if isinstance(result, str):
                found.damaged.append(result)
                continue
            owners[(result.model_version, result.image_uri)] = result.run_id
            screened_as[(result.model_version, result.image_uri)] = (result.sop_instance_uid, result.status)
            if result.status == "duplicate":
                duplicates.append((item[1], result))
            why = published.why_not_held(result)
            if why is not None:
                found.orphans.append(f"{item[1]}: {why}")
    for uri, row in duplicates:  # a duplicate stands only on a first row of the same instance
        first = screened_as.get((row.model_version, row.same_as))
        if first is None or first[0] != row.sop_instance_uid or first[1] == "duplicate":
            found.orphans.append(f"{uri}: a duplicate of {row.same_as!r}, which has no ledger entry of the same "
                                 "instance screened")
    by_run: dict[str, int] = defaultdict(int)
    for run_folder in storage.list_folders(storage.join(results_uri, "runs"), missing_ok=True):
        run_id = storage.relative_to(run_folder, storage.join(results_uri, "runs"))
        for row in _published(results_uri, run_id, found):
            by_run[run_id] += 1
            found.published_rows += 1
            if row.status in ("rejected", "duplicate") and row.reason.endswith(RETRIED_NEXT_RUN):
                continue  # never claimed: tried again next run
            owner = owners.get((row.model_version, row.image_uri))
            if owner is None:
                found.missing.append(f"{layout.run(run_id).outputs['predictions.jsonl']}: the row of "
                                     f"{row.image_uri!r} has no ledger entry for model {row.model_version}")
            elif owner != run_id:
                found.missing.append(f"{layout.run(run_id).outputs['predictions.jsonl']}: the row of "
                                     f"{row.image_uri!r} is claimed by run {owner} in the ledger")
    found.damaged += published.problems
    return found


def _published(results_uri: str, run_id: str, found: Reconciliation) -> list[PredictionRow]:
    """The rows of a published run (its summary exists); [] for a run still open or never published."""
    try:
        outputs = ResultsLayout(results_uri).run(run_id).outputs
    except ValueError:
        return []
    if not storage.exists(outputs["summary.json"]):
        return []
    uri = outputs["predictions.jsonl"]
    try:
        data = storage.read_bytes(uri, max_bytes=MAX_PUBLISHED_BYTES)
    except (storage.NotFound, *_DAMAGED_FILE) as error:
        found.damaged.append(f"{uri}: a published run's predictions cannot be read ({error})")
        return []
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = load_json(line, f"{uri}, line {number}")
            rows.append(PredictionRow.from_record(record, _classes_named(record)))
        except ValueError as error:
            found.damaged.append(f"{uri}, line {number}: {reason(error, f'{uri}, line {number}')}")
    return rows
