"""A screening run's outputs: predictions.csv/.jsonl, summary.json, report.html, Prefect artifacts."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from model.bundle import ModelCard
from tasks import ledger, storage
from tasks.screening import probability_column

__all__ = ["columns", "publish_artifacts", "read_run_rows", "report_html", "summarise", "write_outputs"]

DISCLAIMER = ("Flags are a worklist for radiologist review, not a diagnosis. A flagged image needs a "
              "radiologist's reading; an unflagged image is not cleared.")


def columns(card: ModelCard) -> list[str]:
    return ["image_uri", "sha256", "status", "reason", "model_version", "predicted_class",
            *(probability_column(c) for c in card.classes), "flagged", "screened_at", "run_id"]


def run_folder(results_uri: str, run_id: str) -> str:
    return storage.join(results_uri, "runs", run_id)


def read_run_rows(results_uri: str, run_id: str, model_version: str) -> list[dict]:
    """Every row this run claimed, one per input, sorted by URI.

    The part files hold them with thumbnails. Inputs a chunk recorded but no part covers (the
    process died between claiming and writing its part) come from the ledger, when this run
    claimed them there.
    """
    folder = run_folder(results_uri, run_id)
    rows: dict[str, dict] = {}
    for uri in storage.list_files(storage.join(folder, "parts"), {".jsonl"}, missing_ok=True):
        for line in storage.read_bytes(uri).decode().splitlines():
            if line:
                row = json.loads(line)
                rows.setdefault(row["image_uri"], row)  # a retried chunk may repeat its own rows
    started = set()
    for uri in storage.list_files(storage.join(folder, "chunks"), {".json"}, missing_ok=True):
        started.update(json.loads(storage.read_bytes(uri)))
    uncovered = sorted(started - rows.keys())
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small GET each: latency, not bandwidth, on S3
        for entry in pool.map(lambda uri: _ledger_entry(results_uri, model_version, uri), uncovered):
            if entry is not None and entry.get("run_id") == run_id:
                rows[entry["image_uri"]] = entry
    return [rows[uri] for uri in sorted(rows)]


def _ledger_entry(results_uri: str, model_version: str, image_uri: str) -> dict | None:
    try:
        return ledger.read_entry(results_uri, model_version, image_uri)
    except storage.NotFound:
        return None  # never claimed by anyone: vanished before reading, or the process died first


def write_outputs(results_uri: str, run_id: str, rows: list[dict], card: ModelCard, summary: dict) -> dict[str, str]:
    folder = run_folder(results_uri, run_id)
    names = columns(card)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in names})
    outputs = {name: storage.join(folder, name) for name in
               ("predictions.csv", "predictions.jsonl", "summary.json", "report.html")}
    storage.write_bytes(outputs["predictions.csv"], text.getvalue().encode())
    storage.write_bytes(outputs["predictions.jsonl"], "".join(
        json.dumps({k: row.get(k) for k in names}) + "\n" for row in rows).encode())
    storage.write_bytes(outputs["summary.json"], json.dumps({**summary, "outputs": outputs}, indent=2).encode())
    storage.write_bytes(outputs["report.html"], report_html(summary, rows, card).encode())
    return outputs


def summarise(rows: list[dict], card: ModelCard, **facts) -> dict:
    ok = [row for row in rows if row["status"] == "ok"]
    seconds = facts.get("seconds") or 0.0
    return {
        **facts,
        "model_version": card.version,
        "classes": card.classes,
        "threshold": card.threshold,
        "screened": len(rows),
        "ok": len(ok),
        "rejected": len(rows) - len(ok),
        "flagged": sum(bool(row["flagged"]) for row in rows),
        "predicted": dict(sorted(Counter(row["predicted_class"] for row in ok).items())),
        "images_per_second": round(len(rows) / seconds, 3) if seconds else None,
    }


def _histogram_png(values: list[float], threshold: float, positive: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.8))
    axis.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0")
    axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel(f"probability of {positive}")
    axis.set_ylabel("images")
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def report_html(summary: dict, rows: list[dict], card: ModelCard, max_flagged: int = 500) -> str:
    """One self-contained page: no external files, scripts or fonts."""
    e = html.escape
    positive = card.positive_class
    column = probability_column(positive)
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -(r.get(column) or 0.0))
    rejected = [r for r in rows if r["status"] == "rejected"]
    probabilities = [r[column] for r in rows if r["status"] == "ok"]
    counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in summary["predicted"].items())
    def thumbnail(row: dict) -> str:
        return f'<img src="data:image/jpeg;base64,{row["thumbnail"]}" alt="">' if row.get("thumbnail") else ""

    worklist = "".join(
        f"<tr><td>{i}</td><td>{thumbnail(r)}</td><td>{e(r['image_uri'])}</td><td>{r[column]:.3f}</td>"
        f"<td>{e(r['predicted_class'])}</td></tr>"
        for i, r in enumerate(flagged[:max_flagged], start=1))
    more = f"<p>{len(flagged) - max_flagged} more flagged images are in predictions.csv.</p>" if len(flagged) > max_flagged else ""
    rejects = "".join(f"<tr><td>{e(r['image_uri'])}</td><td>{e(r['reason'])}</td></tr>" for r in rejected)
    metrics = card.metrics.get("positive", {})
    auc = metrics.get("auc")
    abandoned = (f"""<p class="notice">This run stopped without finishing: nothing was heard from it after
{e(str(summary.get('last_seen_at')))}. Run {e(str(summary.get('recovered_by')))} wrote this report from the ledger: it lists
every image this run screened (flagged images recovered that way have no thumbnail). Images it never
reached were screened by later runs.</p>""" if summary.get("status") == "abandoned" else "")
    histogram = (f'<img src="data:image/png;base64,{_histogram_png(probabilities, card.threshold, positive)}" alt="histogram">'
                 if probabilities else "<p>No images were screened successfully.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Chest X-ray screening {e(summary['run_id'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: middle; }}
th {{ background: #f3f3f3; }}
.notice {{ background: #fff4e5; border-left: 5px solid #e69500; padding: 0.8em 1em; }}
img {{ max-height: 160px; }}
</style></head><body>
<h1>Chest X-ray screening</h1>
<p class="notice"><strong>{e(DISCLAIMER)}</strong></p>
{abandoned}
<h2>Run</h2>
<table>
<tr><th>run</th><td>{e(summary['run_id'])}</td></tr>
<tr><th>status</th><td>{e(summary.get('status', ''))}</td></tr>
<tr><th>images screened in this run</th><td>{summary['screened']}</td></tr>
<tr><th>flagged ({e(positive)} probability &ge; {card.threshold:.3f})</th><td>{summary['flagged']}</td></tr>
<tr><th>rejected</th><td>{summary['rejected']}</td></tr>
<tr><th>already screened earlier (skipped)</th><td>{_or_na(summary.get('already_screened'))}</td></tr>
<tr><th>throughput</th><td>{summary.get('images_per_second') or 'n/a'} images/s</td></tr>
</table>
<h2>Model</h2>
<table>
<tr><th>version</th><td>{e(card.version)}</td></tr>
<tr><th>classes</th><td>{e(', '.join(card.classes))}</td></tr>
<tr><th>threshold</th><td>{card.threshold:.4f} (chosen on validation for sensitivity {card.metrics.get('validation', {}).get('target_sensitivity', 'n/a')})</td></tr>
<tr><th>test split: {e(positive)} AUC</th><td>{'n/a' if auc is None else f'{auc:.3f}'}</td></tr>
<tr><th>test split: sensitivity / specificity at threshold</th><td>{metrics.get('sensitivity_at_threshold', float('nan')):.3f} / {metrics.get('specificity_at_threshold', float('nan')):.3f}</td></tr>
<tr><th>weights</th><td>{e(str(card.weights.get('origin')))}</td></tr>
</table>
<p>Test-split figures come from public data sets whose classes differ in age and source as well as
disease; they may not hold for your population.</p>
<h2>Predicted classes</h2>
<table><tr><th>class</th><th>images</th></tr>{counts}</table>
<h2>Probability of {e(positive)}</h2>
{histogram}
<h2>Worklist: flagged images, most probable first</h2>
<table><tr><th>#</th><th>image</th><th>location</th><th>probability</th><th>predicted class</th></tr>{worklist}</table>
{more}
<h2>Rejected inputs</h2>
<table><tr><th>location</th><th>reason</th></tr>{rejects}</table>
</body></html>
"""


def _or_na(value) -> str:
    return "n/a" if value is None else str(value)


def publish_artifacts(summary: dict, rows: list[dict], card: ModelCard, report_uri: str) -> None:
    column = probability_column(card.positive_class)
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -(r.get(column) or 0.0))
    create_table_artifact(
        [{"image_uri": r["image_uri"], column: r[column], "predicted_class": r["predicted_class"]} for r in flagged[:1000]],
        key="screening-flagged", description=f"Flagged images, run {summary['run_id']} (worklist, not a diagnosis)",
    )
    predicted = ", ".join(f"{k} {v}" for k, v in summary["predicted"].items()) or "none"
    create_markdown_artifact(key="screening-summary", description=f"Screening run {summary['run_id']}", markdown=f"""
# Screening run {summary['run_id']} ({summary.get('status')})

| | |
|---|---|
| model | {card.version} (threshold {card.threshold:.4f}) |
| inputs found | {summary.get('inputs_found')} |
| already screened by this model | {summary.get('already_screened')} |
| screened now | {summary['screened']} |
| flagged | {summary['flagged']} |
| rejected | {summary['rejected']} |
| predicted | {predicted} |
| throughput | {summary.get('images_per_second') or 'n/a'} images/s |

Report: `{report_uri}`

**{DISCLAIMER}**
""")
