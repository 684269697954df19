"""Screening work: find inputs, and screen one chunk of them (a Prefect task per chunk).

A chunk is a pure function of its input URIs and the model version: it can run on any worker.
Inside it, a thread pool reads and decodes while the model predicts the previous batch, never
more than ``READ_AHEAD_BATCHES`` batches ahead of it, so a few batches of decoded images are in
memory however large the chunk.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TypeVar

import cv2
import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from imaging.decode import IMAGE_SUFFIXES, is_dicom
from imaging.dicom_identity import Study, deidentify_key
from imaging.raster import encode_png
from imaging.sandbox import decoder_count
from model import stored_json
from model.anatomy import lung_share, resized
from model.bundle import BundleError, ModelCard
from model.devices import share_gpus
from model.drift_tests import image_statistics
from model.evaluation import flags, predict_classes
from model.gradcam import cams_from_maps, predict_and_explain
from model.inference import Predictor, fastest, make_predictor
from model.scope import REASONS, ScopeModel, scope_features
from screening import engine_speeds, leases, ledger
from screening.results import DEIDENTIFIED_PREFIX, PredictionRow, ResultsLayout, input_name
from store import registry, storage
from store.clock import utc_timestamp
from store.engines import explaining_engines, load_artifacts, reduced_decode_allowed, validated_engines
from store.loading import RETRIED_NEXT_RUN, InputLimits, LoadedImage, load_image
from tasks.retrying import io_step

__all__ = ["CLAIMS_IN_FLIGHT", "PEEKS_IN_FLIGHT", "READ_AHEAD_BATCHES", "ChunkResult", "PeekMemory", "bounded_map",
           "chunked", "find_inputs", "read_ahead", "screen_chunk", "screen_images"]

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Never worth peeking into for a DICOM preamble.
_NOT_IMAGES = {".csv", ".json", ".jsonl", ".txt", ".md", ".html", ".htm", ".log", ".xml", ".pdf", ".zip", ".gz"}
# Peeks (a 132-byte ranged GET each, ~30 ms on S3) in flight at once while inputs are found.
PEEKS_IN_FLIGHT = 16
_MEMORY_FORMAT = 1
_VERDICTS = ("dicom", "not_image")  # what a peek found that stays true while the content does


@task(**io_step())
def find_inputs(incoming_uri: str, exclude: Sequence[str] = (), results_uri: str | None = None,
                deidentify: bool = False) -> list[str]:
    """What gets a row: every entry under ``incoming_uri`` named like an image, whatever it is, and
    of the rest (``.csv``, ``.json`` and the like aside) regular files that carry the DICOM preamble
    and entries that cannot be read as a regular file (a FIFO, a broken link, a folder that cannot
    be listed), so that an operator sees them. Sorted.

    Locations in ``exclude`` (the results and the model store, when they lie inside the incoming
    location) are left out, so the system never screens its own outputs.

    Files without an image's name are peeked into (their first 132 bytes), ``PEEKS_IN_FLIGHT`` at a
    time. With ``results_uri``, what a peek found (DICOM or not an image) is remembered there with
    the file's listing stamp (``PeekMemory``) and the file is not peeked into again until its stamp
    changes: each costs one read per content, not one a night for ever. With ``deidentify`` it names
    them there by ``input_name``'s keyed tokens, as rows do.
    """
    excluded = tuple(_comparable(uri).rstrip("/") + "/" for uri in exclude)
    found, unnamed = [], []
    instances = storage.capabilities(incoming_uri).dicom_instances  # a PACS lists DICOM instances only
    for uri, stamp in storage.list_files_stamped(incoming_uri):
        if _comparable(uri).startswith(excluded):
            continue
        suffix = PurePosixPath(uri).suffix.lower()
        if instances or suffix in IMAGE_SUFFIXES:
            found.append(uri)
        elif suffix not in _NOT_IMAGES:
            unnamed.append((uri, stamp))
    memory = PeekMemory(results_uri, incoming_uri, deidentify) if results_uri is not None and unnamed else None
    known = memory.load() if memory is not None else {}
    verdicts = {uri: known[memory.key(uri)][1] for uri, stamp in unnamed
                if stamp is not None and memory is not None and known.get(memory.key(uri), ("",))[0] == stamp}
    to_peek = [(uri, stamp) for uri, stamp in unnamed if uri not in verdicts]
    with ThreadPoolExecutor(max_workers=PEEKS_IN_FLIGHT, thread_name_prefix="peek") as pool:
        peeks = bounded_map(pool, lambda item: _peek(item[0], incoming_uri), to_peek, 4 * PEEKS_IN_FLIGHT)
        for (uri, stamp), verdict in zip(to_peek, peeks):
            if verdict == "unreadable":
                found.append(uri)  # its row will say why; not remembered: that may pass
            elif verdict in _VERDICTS and stamp is not None:
                verdicts[uri] = verdict
            elif verdict == "dicom":
                found.append(uri)
    found += [uri for uri, verdict in verdicts.items() if verdict == "dicom"]
    if unnamed:
        _logger().info("%d file(s) without an image's name: %d known from an earlier peek (unchanged since), %d "
                       "peeked into (%d at a time)", len(unnamed), len(unnamed) - len(to_peek), len(to_peek),
                       PEEKS_IN_FLIGHT)
    if memory is not None:
        memory.save({uri: (stamp, verdicts[uri]) for uri, stamp in unnamed if uri in verdicts and stamp is not None})
    return sorted(found)


def _peek(uri: str, incoming_uri: str) -> str:
    """'dicom', 'not_image', 'unreadable' (its row will say why) or 'gone' (deleted since the listing)."""
    try:
        return "dicom" if is_dicom(storage.read_bytes(uri, length=132, within=incoming_uri)) else "not_image"
    except (storage.Unreadable, storage.AccessDenied):
        return "unreadable"
    except storage.NotFound:
        return "gone"


class PeekMemory:
    """What the files without an image's name under one incoming location were found to be (DICOM or
    not an image), each with the stamp its listing gave (``storage.list_files_stamped``) then.

    One object per incoming location under the results (``ResultsLayout.peeked``), not one per file:
    a night costs one GET, and one PUT only when something changed, however many such files there
    are; per-file objects would cost a PUT each the first night and a listing of their own every
    night. Two runs over one incoming location at once may each write it: the last one wins, and what
    the other learnt is peeked into again, once. Damage costs peeks, never the night: an unreadable,
    damaged or forged object is logged and taken as empty (and rewritten whole).
    """

    def __init__(self, results_uri: str, incoming_uri: str, deidentify: bool = False) -> None:
        self.incoming_uri, self.deidentify = incoming_uri, deidentify
        self.uri = ResultsLayout(results_uri).peeked(incoming_uri)
        self.loaded: dict[str, tuple[str, str]] = {}

    def key(self, uri: str) -> str:
        """How a file is named in the memory: its path below the incoming location, or with
        de-identification its keyed token (a file name can name a patient)."""
        return input_name(uri, True) if self.deidentify else storage.relative_to(uri, self.incoming_uri)

    def _valid_key(self, name: str) -> bool:
        return name.startswith(DEIDENTIFIED_PREFIX) if self.deidentify else _is_relative(name)

    def load(self) -> dict[str, tuple[str, str]]:
        """(stamp, verdict) by ``key``; empty when there is nothing usable."""
        self.loaded = {}
        try:
            data = storage.read_bytes(self.uri, max_bytes=stored_json.MAX_DOCUMENT_BYTES)
        except storage.NotFound:
            return {}
        except storage.StorageError as error:
            _logger().warning("Skipped what earlier runs found peeking into files (each is peeked into again): %s",
                              error)
            return {}
        try:
            record = stored_json.loads(data, self.uri)
            if not isinstance(record, dict) or record.get("format") != _MEMORY_FORMAT \
                    or not all(isinstance(record.get(verdict), dict) for verdict in _VERDICTS):
                raise stored_json.StoredStateError(f"{self.uri}: not a record of peeks of format {_MEMORY_FORMAT}")
        except stored_json.StoredStateError as error:
            _logger().warning("Skipped what earlier runs found peeking into files, damaged (each is peeked into "
                              "again): %s", error)
            return {}
        for verdict in _VERDICTS:
            self.loaded.update({name: (stamp, verdict) for name, stamp in record[verdict].items()
                                if isinstance(stamp, str) and self._valid_key(name)})
        return self.loaded

    def save(self, known: dict[str, tuple[str, str]]) -> None:
        """Remember ``known``, (stamp, verdict) by URI of every such file listed now (those gone drop
        out), unless it is what was loaded. A failed write is logged: the next run peeks again."""
        keyed = {self.key(uri): value for uri, value in known.items()}
        if keyed == self.loaded:
            return
        entries = [(name, stamp, verdict) for name, (stamp, verdict) in sorted(keyed.items())]
        payload, kept = _memory_bytes(entries), entries
        while len(payload) > stored_json.MAX_DOCUMENT_BYTES:  # what the next run would refuse to read
            kept = kept[: len(kept) * stored_json.MAX_DOCUMENT_BYTES // len(payload) * 9 // 10]
            payload = _memory_bytes(kept)
        if len(kept) < len(entries):
            _logger().warning("%d files without an image's name are too many to remember in one document: %d are, "
                              "the other %d are peeked into every night (move them out of %s)", len(entries),
                              len(kept), len(entries) - len(kept), self.incoming_uri)
        try:
            storage.write_bytes(self.uri, payload)
        except storage.StorageError as error:
            _logger().warning("What the peeks found was not kept (the next run peeks again): %s", error)


def _memory_bytes(entries: list[tuple[str, str, str]]) -> bytes:
    record = {"format": _MEMORY_FORMAT, **{verdict: {} for verdict in _VERDICTS}}
    for name, stamp, verdict in entries:
        record[verdict][name] = stamp
    return json.dumps(record, separators=(",", ":")).encode()


def _is_relative(name: str) -> bool:
    return bool(name) and not name.startswith("/") and "://" not in name and ".." not in name.split("/")


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return LOGGER


def bounded_map(pool: Executor, function: Callable[[T], R], items: Sequence[T], ahead: int) -> Iterator[R]:
    """``pool.map(function, items)`` with at most ``ahead`` calls submitted and not yet taken: the
    results (decoded images) waiting for a slow consumer stay bounded, and a consumer that stops
    early leaves at most ``ahead`` calls to finish (the rest are never started)."""
    pending: collections.deque[Future[R]] = collections.deque()
    remaining = iter(items)
    try:
        for item in itertools.islice(remaining, max(ahead, 1)):
            pending.append(pool.submit(function, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(remaining, 1):
                pending.append(pool.submit(function, item))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _comparable(uri: str) -> str:
    return storage.join(uri)  # absolute for local paths, unchanged for S3


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    predictor: Predictor  # runs the forward pass
    model: keras.Model  # the fp32 model, for Grad-CAM's gradients
    why: str  # why this engine
    reduced_decode: bool = False  # large JPEGs decoded at reduced resolution: passed the gate
    # Grad-CAM from the engine's own forward pass: fp32's always, another engine's once its
    # explanations passed their gate; otherwise from a float32 forward pass of their own.
    explains_from_forward: bool = False
    # The scope gate fitted at training (model/scope.py); None for a version trained before it.
    scope: ScopeModel | None = None


@functools.lru_cache(maxsize=2)
def _model(model_store_uri: str, model_version: str, engine: str, batch_size: int, explain: str = "none") -> LoadedModel:
    """Loaded once per process, model version and engine, however many chunks run here. With
    explanations asked for, ``auto`` chooses among the engines whose own maps may explain: another
    would pay a float32 pass for every explained image, and a night flags a large share."""
    share_gpus()
    model, card = registry.load_model(model_store_uri, model_version)
    scope = registry.load_scope(model_store_uri, card)
    if scope is None:
        get_run_logger().warning("Model %s was trained before the scope gate: every decodable image is scored, "
                                 "whatever it shows (train a new version to refuse what is not a chest X-ray)",
                                 card.version)
    allowed, notes = validated_engines(model_store_uri, card)
    spec = card.spec()
    reduced = reduced_decode_allowed(model_store_uri, card)
    shortcut = "; large JPEGs decoded at reduced resolution (passed the gate)" if reduced else ""
    if engine != "auto":
        if engine not in allowed:
            raise BundleError(f"engine {engine} may not serve model {card.version}: {notes}")
        predictor = make_predictor(model, spec, engine, load_artifacts(model_store_uri, card, engine))
        from_forward, explained = _explanations(explaining_engines(model_store_uri, card), card, predictor, explain)
        return LoadedModel(card, predictor, model, f"{engine} asked for{shortcut}{explained}", reduced, from_forward,
                           scope)
    explaining = explaining_engines(model_store_uri, card)
    if explain != "none" and set(allowed) - set(explaining):
        left_out = [name for name in allowed if name not in explaining]
        why_not = (f"left out while explaining: {', '.join(left_out)} (explanations not passed their gate: "
                   f"cxr-screen validate-engines {card.version})")
        notes = "; ".join(filter(None, [notes, why_not]))
        allowed = [name for name in allowed if name in explaining]
    predictors = []
    for name in allowed:
        try:
            predictors.append(make_predictor(model, spec, name, load_artifacts(model_store_uri, card, name)))
        except (BundleError, storage.StorageError, ImportError, RuntimeError) as error:
            # An optional engine that cannot be loaded here is left out; fp32 always can be.
            notes = "; ".join(filter(None, [notes, f"{name} could not be loaded ({error})"]))
    best, why = _fastest_here(predictors, spec.input_size, batch_size)
    from_forward, explained = _explanations(explaining, card, best, explain)
    get_run_logger().info("Engine %s for model %s: %s%s%s", best.engine, card.version, why, f"; {notes}" if notes else "",
                          explained)
    return LoadedModel(card, best, model, why + (f"; {notes}" if notes else "") + shortcut + explained, reduced,
                       from_forward, scope)


def _fastest_here(predictors: list[Predictor], input_size: int, batch_size: int) -> tuple[Predictor, str]:
    """The fastest of ``predictors`` on this machine, by the speeds measured here within the week
    (screening.engine_speeds), or timed now and kept; and the clause saying so."""
    if len(predictors) == 1:
        return predictors[0], "auto: the only validated engine"
    key = engine_speeds.machine_key([predictor.engine for predictor in predictors], input_size, batch_size)
    known = engine_speeds.recall(key)
    if known is None:
        known = engine_speeds.remember(key, fastest(predictors, batch_size)[1])
    best = max(predictors, key=lambda predictor: known.speeds[predictor.engine])
    return best, f"auto: fastest of the validated engines here ({known.describe()})"


def _explanations(explaining: list[str], card: ModelCard, predictor: Predictor, explain: str) -> tuple[bool, str]:
    """Whether ``predictor``'s own maps explain this version (``explaining``: the engines whose may),
    and a clause (empty without explanations) saying how explanations are made."""
    if predictor.engine in explaining:
        return True, "" if explain == "none" else f"; explanations from {predictor.engine}'s forward pass"
    return False, "" if explain == "none" else (
        f"; explanations by a float32 Grad-CAM pass of their own: {predictor.engine}'s explanations have not "
        f"passed their gate (cxr-screen validate-engines {card.version})")


@dataclass
class ChunkResult:
    chunk: int
    claimed: int = 0  # rows this run wrote to the ledger (its share of the chunk)
    ok: int = 0
    rejected: int = 0
    flagged: int = 0
    duplicates: int = 0  # DICOM instances another input screens (their rows say which)
    already_done: int = 0  # claimed first by another run: not this run's rows
    vanished: list[str] = field(default_factory=list)  # listed, then gone before reading
    seconds: float = 0.0
    engine: str = ""
    engine_reason: str = ""


def _thumbnail(pixels: np.ndarray, side: int = 160) -> str:
    small = cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(jpeg.tobytes()).decode() if ok else ""


def _load_or_vanish(uri: str, spec, limits: InputLimits) -> LoadedImage | str:
    try:
        return load_image(uri, spec, limits)
    except storage.NotFound:
        return uri  # deleted or moved since listing: not ours to record; a later run will see
    except storage.StorageError as error:
        if not limits.deidentify:
            raise
        # A failure that ends the chunk reaches Prefect's logs and states: by its token, as the row would.
        raise type(error)(input_name(uri, True), error.reason) from None


def _study_fields(study: Study | None) -> dict[str, str]:
    """A row's PACS identifiers: the study's for a DICOM input, none (empty) for any other."""
    return {} if study is None else study.to_record()


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


# Inputs read and decoded ahead of the model, in batches: enough for the reads to keep the model fed
# (a batch decoded while the previous one is predicted), few enough that decoded images waiting for a
# slower model stay a few batches (224 px: 150 KB each), not the whole chunk.
READ_AHEAD_BATCHES = 2


def read_ahead(batch_size: int, threads: int) -> int:
    """Reads and decodes in flight at most (started and not yet taken by the batch being filled):
    ``READ_AHEAD_BATCHES`` batches, and never fewer than the threads, which would sit idle."""
    return max(READ_AHEAD_BATCHES * batch_size, threads)


def screen_images(
    uris: Sequence[str], loaded_model: LoadedModel, batch_size: int, workers: int | None = None,
    explain: str = "flagged", limits: InputLimits = InputLimits(),
    instances: Callable[[str, str, str], ledger.Owner | None] | None = None,
) -> Iterator[PredictionRow | str]:
    """Rows for ``uris``, or the name of a vanished input. Inputs are named by ``results.input_name``
    (with ``limits.deidentify``, a keyed token: the clear location reaches no row). Flagged rows carry a thumbnail; rows of
    DICOM inputs carry their study's identifiers (``limits.deidentify``: as keyed hashes), and with
    ``limits.frontal_chest_only`` a DICOM that says it is not a frontal chest X-ray is rejected.

    Reading and decoding run ahead on ``workers`` threads (default: two per decoder process, since
    reads wait on storage) while the model predicts, at most ``read_ahead`` inputs ahead of it
    (``READ_AHEAD_BATCHES`` batches): however slow the model and large the chunk, those and the
    batch being filled are all that is decoded and waiting. The images ``explain`` names ('flagged',
    'all' or 'none') are explained by Grad-CAM from the maps of the same forward pass (a gradient
    through the head only), or, where the engine's explanations have not passed their gate, from a
    float32 forward pass of their own. With the version's scope gate (model/scope.py), every decoded
    image is judged from the same forward pass's features and its pixels: one out of scope is a
    rejected row with the gate's reason and never flagged or explained; every row keeps its score.
    With ``instances`` (``ledger.InstanceClaims.screened_as``), a decoded DICOM whose instance
    another input screens is not predicted: its row is a "duplicate" naming that input.

    Raises ``DeidentifyKeyMissing`` before reading anything when de-identification has no key.
    """
    if limits.deidentify:
        deidentify_key()  # no row may be written with its identifiers in the clear
    card, predictor, model = loaded_model.card, loaded_model.predictor, loaded_model.model
    spec = card.spec()
    positive = card.classes.index(card.positive_class)

    scope = loaded_model.scope

    def rows_for(batch: list[LoadedImage]) -> Iterator[PredictionRow]:
        pixels = np.stack([item.pixels for item in batch])
        if explain == "none" and scope is None:
            probabilities, maps = predictor.predict(pixels, batch_size), None
        else:  # the maps give the explanations and the scope gate's features
            probabilities, maps = predictor.predict_with_maps(pixels, batch_size)
        scores, refused = np.full(len(batch), np.nan), [None] * len(batch)
        statistics = np.round(image_statistics(pixels), 4)  # watched for drift (screening/drift.py)
        if scope is not None:
            if maps is None:  # an int8 engine quantised before maps: the features from a float32 pass
                maps = make_predictor(model, spec, "fp32").predict_with_maps(pixels, batch_size)[1]
            scores, refused = scope.judge(pixels, scope_features(maps))
        in_scope = np.array([reason is None for reason in refused])
        flagged = flags(probabilities[:, positive], card.threshold) & in_scope
        predicted = predict_classes(probabilities, card.classes, card.positive_class, card.threshold)
        chosen = {"all": in_scope, "flagged": flagged, "none": np.zeros(len(batch), bool)}[explain]
        cams = {}
        if chosen.any():
            if loaded_model.explains_from_forward and maps is not None:
                explained = cams_from_maps(model, maps[chosen], positive)[0]
            else:  # the float32 reference: a forward pass of its own, for these images only
                explained = predict_and_explain(make_predictor(model, spec, "fp32"), model, pixels[chosen], positive,
                                                batch_size)[1]
            cams = dict(zip(np.flatnonzero(chosen), explained))
        now = utc_timestamp()
        for index, (item, p) in enumerate(zip(batch, probabilities)):
            score = None if np.isnan(scores[index]) else round(float(scores[index]), 3)
            if refused[index] is not None:  # not analysed: the worklist never shows it
                yield PredictionRow(
                    image_uri=input_name(item.uri, limits.deidentify), sha256=item.sha256, status="rejected",
                    reason=REASONS[refused[index]], model_version=card.version, predicted_class="",
                    probabilities=dict.fromkeys(card.classes), flagged=False, screened_at=now, engine=predictor.engine,
                    scope_score=score, image_brightness=float(statistics[index, 0]),
                    image_contrast=float(statistics[index, 1]), **_study_fields(item.study))
                continue
            cam = cams.get(index)
            yield PredictionRow(
                image_uri=input_name(item.uri, limits.deidentify), sha256=item.sha256, status="ok", reason="", model_version=card.version,
                predicted_class=card.classes[int(predicted[index])],
                probabilities={c: round(float(v), 6) for c, v in zip(card.classes, p)},
                flagged=bool(flagged[index]), screened_at=now, engine=predictor.engine,
                cam_lung_share=None if cam is None else _rounded(lung_share(resized(cam, pixels.shape[1:3]))),
                scope_score=score, image_brightness=float(statistics[index, 0]),
                image_contrast=float(statistics[index, 1]),
                thumbnail=_thumbnail(item.pixels) if flagged[index] else None,
                cam=None if cam is None else base64.b64encode(encode_png(np.uint8(np.round(cam * 255)))).decode(),
                **_study_fields(item.study))

    def load(uri: str) -> tuple[LoadedImage | str, ledger.Owner | None]:
        """Read and decoded, and for a DICOM its instance claimed: on the reading threads, since a
        claim is a conditional write (~30 ms on S3)."""
        loaded = _load_or_vanish(uri, spec, limits)
        if instances is None or isinstance(loaded, str) or loaded.pixels is None or loaded.study is None \
                or not loaded.study.sop_instance_uid:
            return loaded, None
        pixels = hashlib.sha256(np.ascontiguousarray(loaded.pixels).tobytes()).hexdigest()
        return loaded, instances(loaded.study.sop_instance_uid, input_name(loaded.uri, limits.deidentify), pixels)

    threads = workers or 2 * decoder_count()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        batch: list[LoadedImage] = []
        for loaded, owner in bounded_map(pool, load, uris, read_ahead(batch_size, threads)):
            if isinstance(loaded, str):
                yield input_name(loaded, limits.deidentify)
            elif owner is not None:  # final once the first row is published; until then, looked at again
                yield PredictionRow(
                    image_uri=input_name(loaded.uri, limits.deidentify), sha256=loaded.sha256, status="duplicate",
                    reason=f"the same DICOM instance (SOP Instance UID and pixels) as {owner.image_uri}, screened by "
                           f"run {owner.run_id}" + ("" if owner.final else f", still open: {RETRIED_NEXT_RUN}"),
                    model_version=card.version, predicted_class="", probabilities=dict.fromkeys(card.classes),
                    flagged=False, screened_at=utc_timestamp(), same_as=owner.image_uri, final=owner.final,
                    **_study_fields(loaded.study))
            elif loaded.pixels is None:
                yield PredictionRow(
                    image_uri=input_name(loaded.uri, limits.deidentify), sha256=loaded.sha256, status="rejected", reason=loaded.reason or "",
                    model_version=card.version, predicted_class="", probabilities=dict.fromkeys(card.classes),
                    flagged=False, screened_at=utc_timestamp(), final=loaded.final, **_study_fields(loaded.study))
            else:
                batch.append(loaded)
                if len(batch) == batch_size:
                    yield from rows_for(batch)
                    batch = []
        if batch:
            yield from rows_for(batch)


# Ledger claims in flight while the model works: one conditional PUT each, ~30 ms on S3, which in
# sequence would cost a fast engine more than its forward passes (bench/scale_bench.py).
CLAIMS_IN_FLIGHT = 16


@task(**io_step(), cache_policy=NO_CACHE, task_run_name="screen-chunk-{chunk}")  # the flow sets its timeout
def screen_chunk(
    chunk: int,
    uris: list[str],
    model_store_uri: str,
    model_version: str,
    results_uri: str,
    run_id: str,
    batch_size: int,
    explain: str = "flagged",
    limits: InputLimits = InputLimits(),
    engine: str = "auto",
) -> ChunkResult:
    """Screen ``uris``, claim each row in the ledger, and write this run's rows as one part file.

    Safe to run again, whole or after dying half-way (a retry, a lost Dask worker): rows this run
    claimed before are kept as they were, rows another run claimed are left to it.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    loaded_model = _model(model_store_uri, model_version, engine, batch_size, explain)
    card = loaded_model.card
    layout = ResultsLayout(results_uri).run(run_id)
    storage.write_bytes(layout.chunk_inputs(chunk),
                        json.dumps([input_name(uri, limits.deidentify) for uri in uris]).encode())
    leases.renew_quietly(results_uri, run_id)
    result = ChunkResult(chunk, engine=loaded_model.predictor.engine, engine_reason=loaded_model.why)
    claimed: list[Future[PredictionRow | None]] = []
    renewed = time.monotonic()
    limits = dataclasses.replace(limits, reduced_decode=loaded_model.reduced_decode)
    try:
        with ThreadPoolExecutor(max_workers=CLAIMS_IN_FLIGHT, thread_name_prefix="claim") as claims:
            instances = ledger.InstanceClaims(results_uri, card.version, run_id, card.classes)
            for produced in screen_images(uris, loaded_model, batch_size, explain=explain, limits=limits,
                                          instances=instances.screened_as):
                if time.monotonic() - renewed > leases.RENEW_EVERY_SECONDS:
                    leases.renew_quietly(results_uri, run_id)
                    renewed = time.monotonic()
                if isinstance(produced, str):
                    logger.warning("%s disappeared before it could be read; left for a later run", produced)
                    result.vanished.append(produced)
                    continue
                produced.run_id = run_id
                if produced.status == "rejected":
                    logger.warning("Rejected %s: %s", produced.image_uri, produced.reason)
                elif produced.status == "duplicate":
                    logger.info("Not screened again: %s is %s", produced.image_uri, produced.reason)
                claimed.append(claims.submit(_claim, results_uri, card, produced))
    finally:
        # Rows claimed before a failure are written too, so they reach this run's outputs.
        kept, failure = _settled(claimed)
        mine = [row for row in kept if row is not None]
        if mine:
            payload = "".join(json.dumps(row.to_record(with_thumbnail=True), sort_keys=True) + "\n" for row in mine)
            storage.write_bytes(layout.part(chunk), payload.encode())
    if failure is not None:
        raise failure
    result.already_done = len(kept) - len(mine)
    result.claimed = len(mine)
    result.ok = sum(row.status == "ok" for row in mine)
    result.rejected = sum(row.status == "rejected" for row in mine)
    result.duplicates = sum(row.status == "duplicate" for row in mine)
    result.flagged = sum(row.flagged for row in mine)
    result.seconds = time.perf_counter() - started
    return result


def _claim(results_uri: str, card: ModelCard, row: PredictionRow) -> PredictionRow | None:
    """The row this run keeps for ``row``'s input: ``row`` once claimed in the ledger (a row that
    may change, e.g. access denied, is kept unclaimed), the one this run claimed in an earlier
    attempt, or None when another run claimed it first."""
    if not row.final or ledger.claim(results_uri, row):
        return row
    try:
        earlier = ledger.read_entry(results_uri, card.version, row.image_uri, card.classes)
    except (ledger.LedgerError, storage.Unreadable) as error:
        # Written since this run listed what was screened: moved aside, and claimed once more.
        kept = ledger.quarantine(results_uri, card.version, row.image_uri)
        _logger().error("%s; moved to %s and claimed again", error, kept)
        return row if ledger.claim(results_uri, row) else None
    if earlier.run_id != row.run_id:
        return None
    earlier.thumbnail, earlier.cam = row.thumbnail, row.cam
    return earlier


def _settled(futures: list[Future[PredictionRow | None]]) -> tuple[list[PredictionRow | None], BaseException | None]:
    """The results of the claims that succeeded (the executor has waited for all), and the first failure."""
    done = [future for future in futures if future.exception() is None]
    failures = [future.exception() for future in futures if future.exception() is not None]
    return [future.result() for future in done], (failures[0] if failures else None)


def chunked(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
