"""A screening run's outputs: predictions.csv/.jsonl, summary.json, report.html, Prefect artifacts."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from model.bundle import ModelCard
from tasks import ledger, storage
from tasks.rendering import render
from tasks.results import PredictionRow, ResultsLayout, RunSummary, probability_column

__all__ = ["DISCLAIMER", "publish_artifacts", "read_run_rows", "report_html", "write_outputs"]

DISCLAIMER = ("Flags are a worklist for radiologist review, not a diagnosis. A flagged image needs a "
              "radiologist's reading; an unflagged image is not cleared.")

logger = logging.getLogger(__name__)

def read_run_rows(results_uri: str, run_id: str, card: ModelCard) -> list[PredictionRow]:
    """Every row this run claimed, one per input, sorted by URI.

    The part files hold them with thumbnails. Inputs a chunk recorded but no part covers (the
    process died between claiming and writing its part, or a part line is damaged) come from the
    ledger, when this run claimed them there. A damaged chunk record or ledger entry raises an
    error naming the file: which rows the run owns could not be told.
    """
    layout = ResultsLayout(results_uri).run(run_id)
    rows: dict[str, PredictionRow] = {}
    for uri in storage.list_files(layout.parts, {".jsonl"}, missing_ok=True):
        for row in _part_rows(uri, run_id, card):
            rows.setdefault(row.image_uri, row)  # a retried chunk may repeat its own rows
    started = set()
    for uri in storage.list_files(layout.chunks, {".json"}, missing_ok=True):
        started.update(_chunk_inputs(uri))
    uncovered = sorted(started - rows.keys())
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small GET each: latency, not bandwidth, on S3
        for entry in pool.map(lambda uri: _ledger_entry(results_uri, card, uri), uncovered):
            if entry is not None and entry.run_id == run_id:
                rows[entry.image_uri] = entry
    return [rows[uri] for uri in sorted(rows)]


def _part_rows(uri: str, run_id: str, card: ModelCard) -> list[PredictionRow]:
    """The valid rows of one part file. A damaged line is logged and left out: its input is in the
    chunk's record, so its row still comes from the ledger."""
    rows = []
    for number, line in enumerate(storage.read_bytes(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = PredictionRow.from_record(json.loads(line), card.classes)
            if (row.run_id, row.model_version) != (run_id, card.version):
                raise ValueError(f"a row of run {row.run_id!r} and model {row.model_version}")
        except ValueError as error:  # JSON, UTF-8 and schema alike
            logger.error("%s, line %d: not a row of run %s (%s); its row is read from the ledger", uri, number,
                         run_id, error)
            continue
        rows.append(row)
    return rows


def _chunk_inputs(uri: str) -> list[str]:
    try:
        inputs = json.loads(storage.read_bytes(uri))
    except ValueError as error:
        raise ValueError(f"{uri}: not a chunk record: {error}") from error
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise ValueError(f"{uri}: not a chunk record: a list of input locations was expected")
    return inputs


def _ledger_entry(results_uri: str, card: ModelCard, image_uri: str) -> PredictionRow | None:
    try:
        return ledger.read_entry(results_uri, card.version, image_uri, card.classes)
    except storage.NotFound:
        return None  # never claimed by anyone: vanished before reading, or the process died first


def write_outputs(results_uri: str, rows: list[PredictionRow], card: ModelCard, summary: RunSummary) -> RunSummary:
    """Writes the run's four output files; returns the summary with their locations."""
    outputs = ResultsLayout(results_uri).run(summary.run_id).outputs
    summary.outputs = outputs
    names = PredictionRow.columns(card.classes)
    records = [row.to_record() for row in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    storage.write_bytes(outputs["predictions.csv"], text.getvalue().encode())
    storage.write_bytes(outputs["predictions.jsonl"], "".join(json.dumps(r) + "\n" for r in records).encode())
    storage.write_bytes(outputs["summary.json"], json.dumps(summary.to_dict(), indent=2).encode())
    storage.write_bytes(outputs["report.html"], report_html(summary, rows, card).encode())
    return summary


def _histogram_png(values: list[float], threshold: float, positive: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.8))
    axis.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0")
    axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel(f"probability of {positive}", parse_math=False)  # a '$' in a class name is not TeX
    axis.set_ylabel("images")
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _worklist(rows: list[PredictionRow], card: ModelCard) -> list[PredictionRow]:
    """Flagged rows, most probable first."""
    return sorted((row for row in rows if row.flagged), key=lambda row: -row.probability(card.positive_class))


def report_html(summary: RunSummary, rows: list[PredictionRow], card: ModelCard, max_flagged: int = 500) -> str:
    """One self-contained page: no external files, scripts or fonts."""
    positive = card.positive_class
    probabilities = [row.probability(positive) for row in rows if row.status == "ok"]
    card_uri = _card_location(summary.model_store_uri, card.version)
    return render("report.html.j2",
        summary=summary, card=card, positive=positive, disclaimer=DISCLAIMER,
        flagged=_worklist(rows, card), max_flagged=max_flagged,
        rejected=[row for row in rows if row.status == "rejected"],
        histogram=_histogram_png(probabilities, card.threshold, positive) if probabilities else None,
        card_uri=card_uri, card_href=_file_link(card_uri),
    )


def _card_location(model_store_uri: str, version: str) -> str:
    """Where the model card lies, as text: a recovered run's store location comes from its lease."""
    if not model_store_uri:
        return "n/a"
    try:
        return storage.join(model_store_uri, version, "card.md")
    except ValueError:  # an unsupported scheme: shown as it is, never followed
        return f"{model_store_uri} (version {version}, card.md)"


def _file_link(uri: str) -> str | None:
    """A file:// link for a local path, percent-encoded; nothing else becomes a link (the store
    location comes from a lease, and a scheme it chose, javascript: say, must not become one)."""
    return PurePosixPath(uri).as_uri() if uri.startswith("/") else None


def publish_artifacts(summary: RunSummary, rows: list[PredictionRow], card: ModelCard) -> None:
    column = probability_column(card.positive_class)
    create_table_artifact(
        [{"image_uri": row.image_uri, column: row.probability(card.positive_class),
          "predicted_class": row.predicted_class} for row in _worklist(rows, card)[:1000]],
        key="screening-flagged", description=f"Flagged images, run {summary.run_id} (worklist, not a diagnosis)",
    )
    markdown = render("summary.md.j2", summary=summary, card=card, disclaimer=DISCLAIMER)
    create_markdown_artifact(key="screening-summary", description=f"Screening run {summary.run_id}",
                             markdown=markdown)
