"""The screening output contract: layout, rows, summaries, and the report built from them."""

from __future__ import annotations

import csv
import io
import json

import pytest

from model.bundle import ModelCard
from tasks import reports, storage
from tasks.results import PredictionRow, ResultsLayout, RunSummary, entry_key

CLASSES = ["non-covid", "covid"]


def card(**changes) -> ModelCard:
    fields = dict(version="v1", classes=CLASSES, positive_class="covid", threshold=0.5,
                  preprocessing={"version": 1, "input_size": 32, "scale_mode": "unit", "interpolation": "area"},
                  weights={"origin": "none", "sha256": None}, dataset={},
                  metrics={"positive": {"auc": 0.9, "sensitivity_at_threshold": 0.95, "specificity_at_threshold": 0.7}})
    return ModelCard(**{**fields, **changes})


def row(name: str, p: float | None, **changes) -> PredictionRow:
    fields = dict(image_uri=f"/in/{name}", sha256="ab" * 32, status="ok" if p is not None else "rejected",
                  reason="" if p is not None else "not an image", model_version="v1",
                  predicted_class="" if p is None else CLASSES[int(p >= 0.5)],
                  probabilities={"non-covid": None if p is None else 1 - p, "covid": p},
                  flagged=p is not None and p >= 0.5, screened_at="2026-11-27T00:00:00+00:00", run_id="r1")
    return PredictionRow(**{**fields, **changes})


def test_columns_follow_the_row_fields_and_the_classes():
    assert PredictionRow.columns(CLASSES) == ["image_uri", "sha256", "status", "reason", "model_version",
                                              "predicted_class", "prob_non-covid", "prob_covid", "flagged",
                                              "screened_at", "run_id", "cam_lung_share"]
    record = row("a.png", 0.8, thumbnail="abc").to_record()
    assert list(record) == PredictionRow.columns(CLASSES)  # the thumbnail never reaches CSV or ledger
    assert row("a.png", 0.8, thumbnail="abc").to_record(with_thumbnail=True)["thumbnail"] == "abc"
    again = PredictionRow.from_record(json.loads(json.dumps(row("a.png", 0.8, thumbnail="t").to_record(True))), CLASSES)
    assert again == row("a.png", 0.8, thumbnail="t")


def test_summary_counts_and_survives_unknown_keys():
    rows = [row("a.png", 0.9), row("b.png", 0.2), row("c.png", None)]
    summary = RunSummary("r1", "v1", seconds=2.0).tally(rows, CLASSES, 0.5)
    assert (summary.screened, summary.ok, summary.rejected, summary.flagged) == (3, 2, 1, 1)
    assert summary.predicted == {"covid": 1, "non-covid": 1} and summary.images_per_second == 1.5
    assert RunSummary.from_dict({**summary.to_dict(), "from_a_newer_version": 1}) == summary


def test_layout_owns_every_path_and_refuses_names_that_escape(tmp_path):
    layout = ResultsLayout(str(tmp_path / "results"))
    run = layout.run("20261127T000000Z-abcdef")
    assert run.part(3).endswith("/runs/20261127T000000Z-abcdef/parts/chunk-000003.jsonl")
    assert run.chunk_inputs(3).endswith("/runs/20261127T000000Z-abcdef/chunks/chunk-000003.json")
    assert set(run.outputs) == {"predictions.csv", "predictions.jsonl", "summary.json", "report.html"}
    assert layout.lease("r1").endswith("/open-runs/r1.json")
    assert layout.ledger_entry("v1", "/in/a.png").endswith(f"/ledger/v1/{entry_key('/in/a.png')}.json")
    for bad in ("../x", "a/b", "..", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="not a safe name"):
            layout.run(bad)
        with pytest.raises(ValueError, match="not a safe name"):
            layout.ledger(bad)


def test_a_file_name_that_is_not_utf8_has_a_ledger_key():
    name = b"/in/scan-\xff.png".decode("utf-8", "surrogateescape")
    assert len(entry_key(name)) == 64 and entry_key(name) != entry_key("/in/scan-.png")


def test_outputs_agree_and_the_report_escapes_what_storage_says(tmp_path):
    hostile = '<script>alert(1)</script>'
    rows = [row(f"{hostile}.png", 0.9), row("b.png", 0.1), row("c.png", None, reason=f"bad {hostile}")]
    model = card(weights={"origin": hostile, "sha256": None})
    summary = RunSummary("r1", "v1", seconds=1.0).tally(rows, CLASSES, 0.5)
    summary = reports.write_outputs(str(tmp_path), rows, model, summary)

    text = storage.read_bytes(summary.outputs["predictions.csv"]).decode()
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["image_uri"] for r in parsed] == [r.image_uri for r in rows]
    assert parsed[2]["prob_covid"] == "" and parsed[0]["flagged"] == "True"
    jsonl = [json.loads(line) for line in storage.read_bytes(summary.outputs["predictions.jsonl"]).splitlines()]
    assert jsonl == [r.to_record() for r in rows]
    assert json.loads(storage.read_bytes(summary.outputs["summary.json"]))["flagged"] == 1

    page = storage.read_bytes(summary.outputs["report.html"]).decode()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") == 3  # the worklist entry, the rejected reason and the card's weights
    assert "not a diagnosis" in page and "0.900" in page


def test_a_shortcut_warning_follows_the_model_into_every_report():
    warned = card(validity={"warnings": ["the label is predictable from age_group alone: metadata-only AUC 0.93"],
                            "strata": {"age_group": {"within_auc": 0.41, "within_auc_ci": [0.2, 0.6]}}})
    rows = [row("a.png", 0.9, cam_lung_share=0.8, explanation="Y2Ft")]
    page = reports.report_html(RunSummary("r1", "v1", model_store_uri="/store").tally(rows, CLASSES, 0.5), rows, warned)
    assert "Shortcut warning" in page and "predictable from age_group alone" in page
    assert "within-stratum AUC by age_group" in page and "0.410" in page and "/store/v1/card.md" in page
    assert 'src="data:image/jpeg;base64,Y2Ft"' in page and "0.80" in page  # the Grad-CAM overlay and its lung share
    assert "Shortcut warning" not in reports.report_html(RunSummary("r1", "v1").tally(rows, CLASSES, 0.5), rows, card())


def test_a_report_with_no_rows_still_renders():
    page = reports.report_html(RunSummary("r1", "v1").tally([], CLASSES, 0.5), [], card())
    assert "No images were screened successfully." in page and "n/a images/s" in page


def test_markdown_from_untrusted_names_stays_text():
    from tasks.rendering import render

    hostile = "St Mary's A&E | <script>x</script> [link](http://x)"
    text = render("summary.md.j2", summary=RunSummary(hostile, "v1").tally([], CLASSES, 0.5), card=card(),
                  disclaimer="d")
    assert "\\|" in text and "\\<script\\>" in text and "\\[link\\]" in text and "A&E" in text
