"""A screening run's outputs: predictions.csv/.jsonl, summary.json, report.html, Prefect artifacts.

Built to stay flat at a national night's scale: the full table goes only to the CSV and JSONL;
report.html shows the ``MAX_FLAGGED`` most probable flagged images and the first ``MAX_REJECTED``
rejected inputs, and says how many more the CSV holds. Only the pictures the report can show are
kept in memory while a run's parts are read. Beside them the report embeds the model's own plots
from its bundle (checked against the card's sha256), the last runs' rates and tonight's drift tests
(screening/drift.py).
"""

from __future__ import annotations

import base64
import csv
import heapq
import io
import json
import logging
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta

import cv2
import numpy as np
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from model.bundle import BundleError, ModelCard
from model.drift_tests import DRIFT_REFERENCE_FILE, Profile
from model.gradcam import overlay
from model.scope import SCOPE_PREFIX
from model.stored_json import loads as load_json
from model.stored_json import reason
from screening import drift, ledger
from screening.results import PredictionRow, ResultsLayout, RunSummary, probability_column
from store import registry, storage
from store.clock import utc_now
from templates import render

__all__ = ["DISCLAIMER", "LINK_SECONDS", "MAX_FLAGGED", "MAX_REJECTED", "MODEL_FIGURES", "Link", "PublishedRunError",
           "heat_map", "model_figures",
           "publish_artifacts", "read_run_rows", "report_html", "shared_link", "write_outputs"]

DISCLAIMER = ("Flags are a worklist for radiologist review, not a diagnosis. A flagged image needs a "
              "radiologist's reading; an unflagged image is not cleared.")
MAX_FLAGGED = 500  # flagged images shown in report.html, most probable first; every one is in predictions.csv
MAX_REJECTED = 500  # rejected inputs listed in report.html; every one is in predictions.csv
READ_AHEAD = 8  # part and chunk files read at once: on S3 a read is mostly latency
# The bundle's plots the report embeds (tasks/bundling.py writes them), with their titles.
MODEL_FIGURES = {"curves.png": "Training curves", "roc.png": "ROC (test split)",
                 "confusion.png": "Confusion matrix (test split)"}
LINK_SECONDS = storage.PRESIGNED_MAX_SECONDS  # how long a presigned link to the report or the card works: 7 days
_PNG = b"\x89PNG\r\n\x1a\n"
# What a link we hand out may hold: a percent-encoded file:// or presigned http(s) URL, nothing that
# could end a Markdown link, an HTML attribute or a table cell.
_LINK = re.compile(r"(?:https?|file)://[A-Za-z0-9\-._~:/?&=%]+")

logger = logging.getLogger(__name__)


def read_run_rows(results_uri: str, run_id: str, card: ModelCard, max_flagged: int = MAX_FLAGGED,
                  damaged: list[str] | None = None) -> list[PredictionRow]:
    """Every row this run claimed, one per input, sorted by URI.

    The part files hold them with thumbnails. Only the ``max_flagged`` most probable flagged rows
    keep theirs (and their Grad-CAM overlays): those are all the report can show, and the rest are
    dropped as the parts are read, so a run of any size holds at most that many pictures.

    Inputs a chunk recorded but no part covers (the process died between claiming and writing its
    part, or a part line is damaged) come from the ledger, when this run claimed them there. A
    damaged part line, chunk record or ledger entry is left out, logged and appended to ``damaged``
    ("location: what is wrong"): one file must not keep the rest of the run from its report, and a
    ledger entry whose row is not published is screened again later (``ledger.screened``).
    """
    damaged = damaged if damaged is not None else []
    layout = ResultsLayout(results_uri).run(run_id)
    rows: dict[str, PredictionRow] = {}
    pictured = _MostProbable(card.positive_class, max_flagged)
    repeated: dict[str, str] = {}
    for uri, data in _read_ahead(storage.list_files(layout.parts, {".jsonl"}, missing_ok=True)):
        for row in _part_rows(uri, data, run_id, card, damaged):
            if row.image_uri not in rows:  # a retried chunk may repeat its own rows
                rows[row.image_uri] = _share_repeated(row, repeated)
                pictured.offer(row)
    uncovered: set[str] = set()
    for uri, data in _read_ahead(storage.list_files(layout.chunks, {".json"}, missing_ok=True)):
        uncovered.update(image_uri for image_uri in _chunk_inputs(uri, data, damaged) if image_uri not in rows)
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small GET each: latency, not bandwidth, on S3
        for entry in pool.map(lambda uri: _ledger_entry(results_uri, card, uri, damaged), sorted(uncovered)):
            if entry is not None and entry.run_id == run_id:
                rows[entry.image_uri] = entry
    return [rows[uri] for uri in sorted(rows)]


def _read_ahead(uris: Iterable[str], ahead: int = READ_AHEAD) -> Iterator[tuple[str, bytes]]:
    """(location, content) of each file in order, with up to ``ahead`` reads in flight: never more
    than that many files in memory, however many there are."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque = deque()
        for uri in uris:
            pending.append((uri, pool.submit(storage.read_bytes, uri)))
            if len(pending) >= ahead:
                done, future = pending.popleft()
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


class _MostProbable:
    """The ``limit`` most probable flagged rows seen so far, in a min-heap; a row that falls out
    (or was never flagged) loses its pictures. Ties go to the earlier location, as in the report."""

    def __init__(self, positive_class: str, limit: int) -> None:
        self.positive_class, self.limit = positive_class, limit
        self.heap: list[_Ranked] = []

    def offer(self, row: PredictionRow) -> None:
        if not row.flagged or self.limit <= 0:
            _drop_pictures(row)
            return
        ranked = _Ranked(row.probability(self.positive_class), row)
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, ranked)
        else:
            _drop_pictures(heapq.heappushpop(self.heap, ranked).row)


class _Ranked:
    """A heap entry: the least probable row on top, then the one with the later location."""

    __slots__ = ("probability", "row")

    def __init__(self, probability: float, row: PredictionRow) -> None:
        self.probability, self.row = probability, row

    def __lt__(self, other: _Ranked) -> bool:
        return (self.probability, other.row.image_uri) < (other.probability, self.row.image_uri)


def _drop_pictures(row: PredictionRow) -> None:
    row.thumbnail = row.cam = row.explanation = None


# Fields whose values repeat from row to row (the run, the model, the engine, the class, the second
# screened): one string object per distinct value instead of one per row, a third of a row's memory.
_REPEATED_FIELDS = ("model_version", "run_id", "status", "reason", "predicted_class", "engine", "screened_at")


def _share_repeated(row: PredictionRow, seen: dict[str, str]) -> PredictionRow:
    for name in _REPEATED_FIELDS:
        value = getattr(row, name)
        setattr(row, name, seen.setdefault(value, value))
    return row


def _part_rows(uri: str, data: bytes, run_id: str, card: ModelCard, damaged: list[str]) -> Iterator[PredictionRow]:
    """The valid rows of one part file. A damaged line is left out: its input is in the chunk's
    record, so its row still comes from the ledger."""
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri}, line {number}"
        try:
            row = PredictionRow.from_record(load_json(line, where), card.classes)
            if (row.run_id, row.model_version) != (run_id, card.version):
                raise ValueError(f"a row of run {row.run_id!r} and model {row.model_version}")
        except ValueError as error:  # JSON, UTF-8, bounds and schema alike
            _damage(damaged, where, error, f"not a row of run {run_id}; its row is read from the ledger")
            continue
        yield row


def _damage(damaged: list[str], where: str, error: Exception, consequence: str) -> None:
    problem = f"{where}: {reason(error, where)}"
    logger.error("%s (%s)", problem, consequence)
    damaged.append(f"{problem} ({consequence})")


def _chunk_inputs(uri: str, data: bytes, damaged: list[str]) -> list[str]:
    try:
        inputs = load_json(data, uri)
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
            raise ValueError("a list of input locations was expected")
    except ValueError as error:
        _damage(damaged, uri, error, "not a chunk record; the rows of its parts are kept")
        return []
    return inputs


def _ledger_entry(results_uri: str, card: ModelCard, image_uri: str, damaged: list[str]) -> PredictionRow | None:
    try:
        return ledger.read_entry(results_uri, card.version, image_uri, card.classes)
    except storage.NotFound:
        return None  # never claimed by anyone: vanished before reading, or the process died first
    except (ledger.LedgerError, storage.Unreadable, storage.AccessDenied, storage.NotAFolder) as error:
        _damage(damaged, ResultsLayout(results_uri).ledger_entry(card.version, image_uri), error,
                "left out of this run's rows; its input is screened again")
        return None


class PublishedRunError(ValueError):
    """A run whose outputs are published already: they are never written again."""


def write_outputs(results_uri: str, rows: list[PredictionRow], card: ModelCard, summary: RunSummary,
                  drift_window: int = drift.DRIFT_WINDOW) -> RunSummary:
    """Writes the run's four output files; returns the summary with their locations. Each file is
    built as one bytes object from the rows, one row at a time, and dropped once written.

    Published runs are immutable: ``summary.json`` is written last, create-if-absent, and a run
    that has one is refused with PublishedRunError before each file is written, unless that
    summary is this very write's, published by an earlier attempt (a retry after the artifacts or
    the lease failed): then it is returned as it is. Until then the other files may be rewritten
    (a retry, or two runs recovering the same dead run, write the same rows)."""
    outputs = ResultsLayout(results_uri).run(summary.run_id).outputs
    published = _published(outputs["summary.json"], summary)
    if published is not None:
        return published
    history = drift.recent_runs(results_uri, summary)
    summary = summary.with_drift(rows, card.positive_class)
    summary.note_damage(list(history.damaged))
    summary = drift.judge(summary, rows, card.positive_class, history, _test_split(summary, card),
                          drift_window, drift.accepted_runs(results_uri))
    history = replace(history, runs=(*history.earlier, drift.RunRates.of(summary)))
    summary.outputs = outputs
    card_uri = _card_location(summary.model_store_uri, card.version)
    files = {"predictions.csv": lambda: _csv_bytes(rows, card.classes), "predictions.jsonl": lambda: _jsonl_bytes(rows),
             "report.html": lambda: report_html(summary, rows, card, figures=model_figures(summary.model_store_uri, card),
                                                card_link=shared_link(card_uri), history=history).encode()}
    for name, build in files.items():
        data = build()
        if storage.exists(outputs["summary.json"]) and _published(outputs["summary.json"], summary) is not None:
            raise PublishedRunError(f"{outputs['summary.json']}: run {summary.run_id} was published by another run "
                                    "while this one wrote its outputs")
        storage.write_bytes(outputs[name], data)
    if not storage.create_if_absent(outputs["summary.json"], json.dumps(summary.to_dict(), indent=2).encode()):
        published = _published(outputs["summary.json"], summary)  # a PUT retried after it landed reads back as ours
        if published is None:
            raise PublishedRunError(f"{outputs['summary.json']}: run {summary.run_id} was published by another run "
                                    "while this one wrote its outputs")
        return published
    return summary


def _test_split(summary: RunSummary, card: ModelCard) -> Profile | None:
    """The version's drift reference from its bundle; None (and a damaged file noted) where it cannot be read."""
    try:
        return registry.load_drift_reference(summary.model_store_uri, card)
    except (OSError, ValueError) as error:  # BundleError, StorageError: tonight is still reported
        problem = f"{card.version}/{DRIFT_REFERENCE_FILE}: not used as the drift reference ({error})"
        logger.error("%s", problem)
        summary.note_damage([problem])
        return None


def _published(uri: str, summary: RunSummary) -> RunSummary | None:
    """None when the run has no summary yet; the stored summary when it is ``summary``'s own (same
    run, start, flow run and recoverer: an earlier attempt of this write); PublishedRunError else."""
    try:
        data = storage.read_bytes(uri, max_bytes=1 << 24)
    except storage.NotFound:
        return None
    except (OSError, ValueError) as error:
        raise PublishedRunError(f"{uri}: run {summary.run_id} is published already ({error}); "
                                "its outputs are never written again") from error
    try:
        stored = RunSummary.from_dict(load_json(data, uri))
    except ValueError:
        stored = None
    same = ("run_id", "started_at", "flow_run_id", "recovered_by")
    if stored is not None and all(getattr(stored, name) == getattr(summary, name) for name in same):
        return stored
    raise PublishedRunError(f"{uri}: run {summary.run_id} is published already; its outputs are never written again")


def _csv_bytes(rows: list[PredictionRow], classes: list[str]) -> bytes:
    names = PredictionRow.columns(classes)
    buffer = io.BytesIO()
    text = io.TextIOWrapper(buffer, encoding="utf-8", newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        record = row.to_record()
        writer.writerow(["" if record.get(name) is None else record[name] for name in names])
    text.detach()  # flushes into the buffer and leaves it open
    return buffer.getvalue()


def _jsonl_bytes(rows: list[PredictionRow]) -> bytes:
    buffer = io.BytesIO()
    for row in rows:
        buffer.write(json.dumps(row.to_record()).encode() + b"\n")
    return buffer.getvalue()


def _histogram_png(values: np.ndarray, threshold: float, positive: str) -> str:
    import matplotlib.pyplot as plt

    from model.plots import figure_png  # matplotlib (with the Agg backend) only when there is a histogram

    figure, axis = plt.subplots(figsize=(6, 2.8))
    axis.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0")
    axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel(f"probability of {positive}", parse_math=False)  # a '$' in a class name is not TeX
    axis.set_ylabel("images")
    axis.legend()
    return base64.b64encode(figure_png(figure, dpi=100)).decode()


def _worklist(rows: Iterable[PredictionRow], card: ModelCard, limit: int) -> list[PredictionRow]:
    """The ``limit`` most probable flagged rows, most probable first (ties in the rows' order)."""
    return heapq.nsmallest(limit, (row for row in rows if row.flagged),
                           key=lambda row: -row.probability(card.positive_class))


# A map at its own resolution is a few hundred bytes; anything much larger is not one this code wrote.
_LARGEST_CAM = 64 * 1024


def heat_map(row: PredictionRow) -> np.ndarray | None:
    """The row's Grad-CAM coloured and laid over its thumbnail (RGB), or None where the row has no
    map and thumbnail, or they do not decode, or the map is larger than one this code wrote."""
    if not row.cam or not row.thumbnail or len(row.cam) > _LARGEST_CAM:
        return None
    thumbnail = cv2.imdecode(np.frombuffer(base64.b64decode(row.thumbnail), np.uint8), cv2.IMREAD_COLOR)
    cam = cv2.imdecode(np.frombuffer(base64.b64decode(row.cam), np.uint8), cv2.IMREAD_GRAYSCALE)
    if thumbnail is None or cam is None:
        return None
    return overlay(cv2.cvtColor(thumbnail, cv2.COLOR_BGR2RGB), cam.astype(np.float32) / 255.0)


def _with_overlay(row: PredictionRow) -> PredictionRow:
    """The row with its heat map as a JPEG: done here, for the rows the page shows, rather than in
    screening for every explained image. A row from before maps were kept carries its overlay
    already; one whose pictures do not decode is shown without."""
    blended = None if row.explanation else heat_map(row)
    if blended is None:
        return row
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return replace(row, explanation=base64.b64encode(jpeg.tobytes()).decode()) if ok else row


def report_html(summary: RunSummary, rows: list[PredictionRow], card: ModelCard, max_flagged: int = MAX_FLAGGED,
                max_rejected: int = MAX_REJECTED, *, figures: dict[str, str] | None = None,
                card_link: Link | None = None, history: drift.Drift | None = None) -> str:
    """One self-contained page: no external files, scripts or fonts. The worklist first (at most
    ``max_flagged`` images), then the rejected inputs (at most ``max_rejected``), then the counts,
    the last runs' rates and the model; the page says how many more of each are in predictions.csv.

    Built from what it is given, reading nothing: ``figures`` (``model_figures``: the bundle's
    plots, base64 PNG, by name; those missing show as not available), ``card_link`` (defaults to a
    file:// link for a local store, none otherwise), ``history`` (``drift.recent_runs``; defaults
    to this run alone)."""
    positive = card.positive_class
    probabilities = np.fromiter((row.probability(positive) for row in rows if row.status == "ok"), float)
    rejected = [row for row in rows if row.status == "rejected"]
    card_uri = _card_location(summary.model_store_uri, card.version)
    history = history or drift.Drift((drift.RunRates.of(summary),))
    return render("report.html.j2",
        summary=summary, card=card, positive=positive, disclaimer=DISCLAIMER,
        worklist=[_with_overlay(row) for row in _worklist(rows, card, max_flagged)], flagged=sum(row.flagged for row in rows),
        rejected=rejected[:max_rejected], rejected_count=len(rejected), rejected_by_reason=_by_reason(rejected),
        histogram=_histogram_png(probabilities, card.threshold, positive) if probabilities.size else None,
        card_uri=card_uri, card_link=card_link or _file_link(card_uri),
        figures=[(title, (figures or {}).get(name)) for name, title in MODEL_FIGURES.items()],
        history=history, drift_chart=history.chart_png(), drift_score_chart=history.score_chart_png(),
        drift=summary.drift, alarm_line=drift.alarm_score(summary.drift),
    )


def _by_reason(rejected: list[PredictionRow]) -> list[tuple[str, int]]:
    """Counts of the scope gate's reasons (a fixed vocabulary, model/scope.py) and, as one line, of
    everything refused before the model (unreadable, undecodable, too large: each row says which)."""
    counted = Counter(row.reason if row.reason.startswith(SCOPE_PREFIX) else "refused before the model"
                                  for row in rejected)
    return counted.most_common()


def model_figures(model_store_uri: str, card: ModelCard) -> dict[str, str]:
    """The bundle's plots (``MODEL_FIGURES``) as base64 PNG, each checked against the card's sha256.
    A plot the card does not list (a bundle from before them) is left out; one that cannot be read
    (the store unreachable, say, for a recovered run) or does not match is logged and left out."""
    found = {}
    for name in MODEL_FIGURES:
        if not model_store_uri or name not in (card.files or {}):
            continue
        try:
            data = registry.read_file(model_store_uri, card, name)
        except (BundleError, OSError, ValueError) as error:  # a changed file, a failed read, a bad location
            logger.warning("%s of model %s is left out of the report: %s", name, card.version, error)
            continue
        if not data.startswith(_PNG):  # vouched for by the card, but the page would show a broken image
            logger.warning("%s of model %s is left out of the report: not a PNG", name, card.version)
            continue
        found[name] = base64.b64encode(data).decode()
    return found


@dataclass(frozen=True)
class Link:
    """A URL to a stored file, and until when it works (None: for as long as the file is there)."""

    href: str
    expires_at: str | None = None


def shared_link(uri: str, seconds: int = LINK_SECONDS) -> Link | None:
    """A link to the file at ``uri``: a presigned URL where storage signs them (S3, valid ``seconds``),
    else the file's own URI (file:// for a local file); None for a relative path or a location storage
    does not address, or when it cannot sign (no credentials)."""
    if "://" not in uri and not uri.startswith("/"):  # "javascript:alert(1)" is a relative path
        return None
    try:
        signed = storage.capabilities(uri).presignable
    except storage.LocationError:
        return None
    try:
        href = storage.presigned_url(uri, seconds)
    except (OSError, ValueError) as error:  # no credentials; a location storage refuses
        logger.warning("No link to %s: %s", uri, error)
        return None
    if not _LINK.fullmatch(href):  # an endpoint this code would not hand out as a link
        logger.warning("No link to %s: the URL storage gave is not one this report links to", uri)
        return None
    expires = None
    if signed:
        expires = (utc_now() + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M UTC")
    return Link(href, expires)


def _card_location(model_store_uri: str, version: str) -> str:
    """Where the model card lies, as text: a recovered run's store location comes from its lease."""
    if not model_store_uri:
        return "n/a"
    try:
        return storage.join(model_store_uri, version, "card.md")
    except ValueError:  # an unsupported scheme: shown as it is, never followed
        return f"{model_store_uri} (version {version}, card.md)"


def _file_link(uri: str) -> Link | None:
    """A link that needs no signing (a local file's percent-encoded file:// URI); nothing else becomes
    a link (the store location comes from a lease, and a scheme it chose, javascript: say, must not
    become one)."""
    try:
        signed = storage.capabilities(uri).presignable
    except storage.LocationError:
        return None
    return None if signed else shared_link(uri)


def publish_artifacts(summary: RunSummary, rows: list[PredictionRow], card: ModelCard) -> None:
    column = probability_column(card.positive_class)
    create_table_artifact(
        [{"image_uri": row.image_uri, column: row.probability(card.positive_class),
          "predicted_class": row.predicted_class} for row in _worklist(rows, card, 1000)],
        key="screening-flagged", description=f"Flagged images, run {summary.run_id} (worklist, not a diagnosis)",
    )
    report_uri = summary.outputs.get("report.html", "")
    # Prefect keeps artifacts for as long as it keeps runs, readable by whoever reads the API: a
    # presigned URL there would be a bearer token to the report for its whole life. So only a
    # link that grants nothing (file://) is kept; on S3 the artifact names the object, and
    # 'cxr-screen report-link RUN_ID' makes a short-lived link when a person needs one.
    link = shared_link(report_uri) if report_uri else None
    link = link if link is not None and link.expires_at is None else None
    if link is not None:
        create_link_artifact(link=link.href, link_text=f"Report of screening run {summary.run_id}",
                             key="screening-report", description=f"report.html of run {summary.run_id}")
    markdown = render("summary.md.j2", summary=summary, card=card, disclaimer=DISCLAIMER, report_link=link)
    create_markdown_artifact(key="screening-summary", description=f"Screening run {summary.run_id}",
                             markdown=markdown)
