"""report.html at a national night's scale: capped lists that say what they leave to the CSV, and only
the pictures the report can show kept in memory while a run's parts are read."""

from __future__ import annotations

import csv
import io
import json
import random
import threading

from screening import reports
from screening.results import PredictionRow, ResultsLayout, RunSummary
from store import storage
from tests.test_results import CLASSES, card, row

THUMBNAIL, EXPLANATION = "dGh1bWI=", "Y2Ft"


def flagged_row(index: int, p: float) -> PredictionRow:
    return row(f"{index:05d}.png", p, thumbnail=THUMBNAIL, explanation=EXPLANATION, cam_lung_share=0.7)


def write_run(results: str, rows: list[PredictionRow], chunk_size: int) -> None:
    """Parts and chunk records as screen_chunk writes them."""
    layout = ResultsLayout(results).run("r1")
    for chunk, start in enumerate(range(0, len(rows), chunk_size)):
        mine = rows[start : start + chunk_size]
        storage.write_bytes(layout.chunk_inputs(chunk), json.dumps([r.image_uri for r in mine]).encode())
        storage.write_bytes(layout.part(chunk), "".join(json.dumps(r.to_record(with_thumbnail=True), sort_keys=True)
                                                       + "\n" for r in mine).encode())


def test_only_the_most_probable_flagged_rows_keep_their_pictures(tmp_path):
    results = str(tmp_path / "results")
    # Ties on purpose (three probabilities for 40 flagged rows), spread over parts out of location order.
    flagged = [flagged_row(index, random.Random(index).choice([0.6, 0.8, 0.95])) for index in range(40)]
    written = flagged + [row(f"clear-{i}.png", 0.1, thumbnail=THUMBNAIL) for i in range(10)]
    random.Random(0).shuffle(written)
    write_run(results, written, chunk_size=7)

    rows = reports.read_run_rows(results, "r1", card(), max_flagged=5)

    assert [r.image_uri for r in rows] == sorted(r.image_uri for r in written)  # every row, sorted, none twice
    pictured = [r for r in rows if r.thumbnail or r.explanation]
    expected = sorted((r for r in rows if r.flagged), key=lambda r: (-r.probability("covid"), r.image_uri))[:5]
    assert pictured == sorted(expected, key=lambda r: r.image_uri)
    assert all((r.thumbnail, r.explanation) == (THUMBNAIL, EXPLANATION) for r in pictured)
    page = reports.report_html(RunSummary("r1", "v1").tally(rows, CLASSES, 0.5), rows, card(), max_flagged=5)
    assert page.count(f'src="data:image/jpeg;base64,{THUMBNAIL}"') == 5  # each row the page shows has its pictures
    assert page.count('alt="Grad-CAM"') == 5 and "35 more flagged images are in predictions.csv" in page


def test_the_report_caps_the_worklist_and_the_rejected_inputs_and_the_csv_keeps_every_row(tmp_path):
    over = 3
    flagged = [flagged_row(index, 0.5 + index / 10_000) for index in range(reports.MAX_FLAGGED + over)]
    rejected = [row(f"bad-{index:05d}.png", None, reason=f"not an image {index}")
                for index in range(reports.MAX_REJECTED + 2 * over)]
    rows = sorted(flagged + rejected + [row("clear.png", 0.2)], key=lambda r: r.image_uri)
    summary = RunSummary("r1", "v1", seconds=1.0).tally(rows, CLASSES, 0.5)
    summary = reports.write_outputs(str(tmp_path), rows, card(), summary)

    page = storage.read_bytes(summary.outputs["report.html"]).decode()
    assert page.count('alt="Grad-CAM"') == reports.MAX_FLAGGED
    assert f"{over} more flagged images are in predictions.csv" in page
    assert flagged[-1].image_uri in page and flagged[over - 1].image_uri not in page  # the least probable left out
    assert page.count("not an image ") == reports.MAX_REJECTED
    assert f"{2 * over} more rejected inputs are in predictions.csv" in page
    assert page.index("Worklist") < page.index("Rejected inputs") < page.index("Counts")
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(summary.outputs["predictions.csv"]).decode())))
    assert [r["image_uri"] for r in table] == [r.image_uri for r in rows]
    assert sum(r["status"] == "rejected" for r in table) == len(rejected)
    assert len(storage.read_bytes(summary.outputs["predictions.jsonl"]).splitlines()) == len(rows)


def test_a_report_within_the_caps_says_nothing_is_left_out():
    rows = [flagged_row(0, 0.9), row("bad.png", None), row("clear.png", 0.1)]
    page = reports.report_html(RunSummary("r1", "v1").tally(rows, CLASSES, 0.5), rows, card())
    assert "more flagged images" not in page and "more rejected inputs" not in page
    quiet = [row("clear.png", 0.1)]
    page = reports.report_html(RunSummary("r1", "v1").tally(quiet, CLASSES, 0.5), quiet, card())
    assert "No image was flagged." in page and "None." in page


def test_parts_are_read_a_few_ahead_in_order(tmp_path, monkeypatch):
    uris = [str(tmp_path / f"{index}.jsonl") for index in range(30)]
    for uri in uris:
        storage.write_bytes(uri, uri.encode())
    started, lock, read = [], threading.Lock(), storage.read_bytes

    def counting(uri, *args, **kwargs):
        with lock:
            started.append(uri)
        return read(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", counting)
    for consumed, (uri, data) in enumerate(reports._read_ahead(uris, ahead=4), start=1):
        assert data == uri.encode() and uri == uris[consumed - 1]
        assert len(started) <= consumed + 3  # never more than `ahead` files read and not yet used
