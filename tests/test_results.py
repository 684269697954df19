"""The screening output contract: layout, rows, summaries, and the report built from them."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from model.bundle import ModelCard
from screening import reports
from screening.results import PredictionRow, ResultsLayout, RunSummary, entry_key
from store import storage

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
                                              "screened_at", "run_id", "engine", "cam_lung_share", "scope_score",
                                              "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                                              "accession_number", "view_position", "modality", "manufacturer",
                                              "photometric_interpretation", "pixel_spacing", "image_brightness",
                                              "image_contrast", "same_as", "delivery"]
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


STUDY = dict(study_instance_uid="1.2.840.113619.2.55.3.1", series_instance_uid="1.2.840.113619.2.55.3.2",
             sop_instance_uid="1.2.840.113619.2.55.3.3", accession_number="ACC-20261127-7", view_position="PA")


def test_the_worklist_and_rejected_inputs_show_where_pacs_keeps_the_study():
    rows = [row("flagged.dcm", 0.9, **STUDY), row("a.png", 0.95),
            row("lateral.dcm", None, reason="not a frontal chest X-ray: lateral view (DICOM ViewPosition LL)",
                **{**STUDY, "accession_number": "ACC-9", "view_position": "LL"})]
    page = reports.report_html(RunSummary("r1", "v1").tally(rows, CLASSES, 0.5), rows, card())
    flagged = page[page.index("/in/flagged.dcm"):]
    assert flagged.startswith("/in/flagged.dcm<div>accession ACC-20261127-7</div>"
                              "<div>study 1.2.840.113619.2.55.3.1</div>")
    assert "/in/a.png</td>" in page  # no identifiers: nothing beside the path
    assert "/in/lateral.dcm<div>accession ACC-9</div>" in page and "lateral view (DICOM ViewPosition LL)" in page


def test_identifiers_from_storage_are_escaped_in_the_report():
    hostile = '<script>alert(1)</script>'
    rows = [row("a.dcm", 0.9, accession_number=hostile, study_instance_uid=f'"><img src=x onerror={hostile}>')]
    page = reports.report_html(RunSummary("r1", "v1").tally(rows, CLASSES, 0.5), rows, card())
    assert "<script" not in page and "<img src=x" not in page
    assert "accession &lt;script&gt;" in page and "study &#34;&gt;&lt;img src=x" in page


def test_markdown_from_untrusted_names_stays_text():
    from templates import render

    hostile = "St Mary's A&E | <script>x</script> [link](http://x)"
    text = render("summary.md.j2", summary=RunSummary(hostile, "v1").tally([], CLASSES, 0.5), card=card(),
                  disclaimer="d")
    assert "&#124;" in text and "&lt;script&gt;" in text and "&#91;link&#93;" in text and "A&E" in text
    assert "<" not in text and "[" not in text


# --- what is read back from storage is checked ----------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("prob_covid", "0.9", "prob_covid '0.9' is not a number in [0, 1] or null"),
    ("prob_covid", 1.5, "prob_covid 1.5 is not a number"),
    ("prob_covid", float("nan"), "prob_covid nan"),
    ("status", "maybe", "status 'maybe' is not one of ok, rejected"),
    ("model_version", "../../x", "model_version '../../x' is not a safe name"),
    ("run_id", "../r1", "run_id '../r1' is not a run id"),
    ("flagged", "yes", "flagged 'yes' is not true or false"),
    ("screened_at", "last night", "screened_at 'last night' is not an ISO 8601 time"),
    ("image_uri", 7, "image_uri 7 is not a location"),
    ("sha256", "abc", "sha256 'abc' is not a sha256"),
    ("thumbnail", '"><img src=x onerror=alert(1)>', "is not base64 text"),
    ("study_instance_uid", "1.2.3.DOE^JANE", "is not a DICOM UID or empty"),
    ("series_instance_uid", "1." * 40 + "1", "is not a DICOM UID or empty"),
    ("sop_instance_uid", None, "sop_instance_uid None is not a DICOM UID or empty"),
    ("accession_number", "DOE^JANE", "accession_number 'DOE^JANE' is not an accession number or empty"),
    ("accession_number", "=HYPERLINK(1)", "is not an accession number or empty"),
    ("view_position", "Zorblattnik", "view_position 'Zorblattnik' is not a view position or empty"),
])
def test_a_row_read_back_is_refused_when_a_field_is_wrong(field, value, message):
    record = {**row("a.png", 0.9).to_record(), field: value}
    with pytest.raises(ValueError) as raised:
        PredictionRow.from_record(record, CLASSES)
    assert message in str(raised.value)
    with pytest.raises(ValueError, match="status missing"):
        PredictionRow.from_record({k: v for k, v in row("a.png", 0.9).to_record().items() if k != "status"}, CLASSES)
    with pytest.raises(ValueError, match="JSON object was expected, found list"):
        PredictionRow.from_record([1, 2], CLASSES)


def test_a_row_with_study_identifiers_reads_back_and_one_written_before_them_reads_back_empty():
    with_study = row("a.dcm", 0.9, **STUDY)
    assert PredictionRow.from_record(json.loads(json.dumps(with_study.to_record())), CLASSES) == with_study
    older = {name: value for name, value in row("a.png", 0.9).to_record().items() if name not in STUDY}
    again = PredictionRow.from_record(older, CLASSES)
    assert again == row("a.png", 0.9) and all(getattr(again, name) == "" for name in STUDY)


@pytest.mark.parametrize("field, value", [
    ("run_id", "../../elsewhere"), ("model_version", "a/b"), ("status", "<script>"), ("seconds", "fast"),
    ("seconds", float("inf")), ("recovered_runs", ["ok", "../x"]), ("flow_run_id", "not-a-uuid"),
    ("recovered_by", "<b>x</b>"), ("last_seen_at", "<script>"), ("incoming_uri", ["s3://x"]),
    ("to_screen", -1), ("screened", True), ("predicted", {"covid": "many"}), ("outputs", {"report.html": 1}),
])
def test_a_summary_read_back_is_refused_when_a_field_is_wrong(field, value):
    good = RunSummary("r1", "v1", flow_run_id="0b8f6c1e-5b7e-4e43-9d2e-3a4f1f1f0a11", started_at="2026-11-27T00:00:00+00:00")
    assert RunSummary.from_dict(good.to_dict()) == good
    with pytest.raises(ValueError, match=f"^{field} "):
        RunSummary.from_dict({**good.to_dict(), field: value})


def test_a_damaged_or_misplaced_ledger_entry_is_refused_naming_its_file(tmp_path):
    from screening import ledger

    results = str(tmp_path / "results")
    assert ledger.claim(results, row("a.png", 0.9))
    assert ledger.read_entry(results, "v1", "/in/a.png", CLASSES) == row("a.png", 0.9)
    entry = ResultsLayout(results).ledger_entry("v1", "/in/b.png")
    cases = {
        b"{not json": "not a ledger entry",
        b"\xff\xfe": "not a ledger entry",
        json.dumps({**row("b.png", 0.9).to_record(), "prob_covid": "high"}).encode(): "prob_covid 'high'",
        json.dumps(row("a.png", 0.9).to_record()).encode(): "records '/in/a.png' for model v1, not '/in/b.png'",
    }
    for content, message in cases.items():
        storage.write_bytes(entry, content)
        with pytest.raises(ledger.LedgerError, match=message) as raised:
            ledger.read_entry(results, "v1", "/in/b.png", CLASSES)
        assert str(raised.value).startswith(entry)


def test_a_damaged_part_line_falls_back_to_the_ledger_and_a_damaged_chunk_record_is_named_and_skipped(tmp_path, caplog):
    import logging

    from screening import ledger

    results = str(tmp_path / "results")
    mine = [row("a.png", 0.9, thumbnail="dGh1bWI="), row("b.png", 0.1)]
    for claimed in mine:
        ledger.claim(results, claimed)
    layout = ResultsLayout(results).run("r1")
    storage.write_bytes(layout.chunk_inputs(0), json.dumps(["/in/a.png", "/in/b.png"]).encode())
    forged = {**mine[1].to_record(), "run_id": "another-run"}
    storage.write_bytes(layout.part(0), (json.dumps(mine[0].to_record(True)) + "\n{damaged\n" + json.dumps(forged)
                                         + "\n").encode())
    damaged: list[str] = []
    with caplog.at_level(logging.ERROR, logger="screening.reports"):
        rows = reports.read_run_rows(results, "r1", card(), damaged=damaged)
    assert rows == mine  # b.png from the ledger, a.png with its thumbnail from the part
    assert "chunk-000000.jsonl, line 2: not valid JSON" in caplog.text and "not a row of run r1" in caplog.text
    assert [line.split(": ")[0].rsplit("/", 1)[1] for line in damaged] == ["chunk-000000.jsonl, line 2",
                                                                     "chunk-000000.jsonl, line 3"]

    # A damaged chunk record is named and skipped: the rows of the parts still reach the report.
    storage.write_bytes(layout.chunk_inputs(1), json.dumps({"a": 1}).encode())
    damaged = []
    assert reports.read_run_rows(results, "r1", card(), damaged=damaged) == mine
    assert any("chunk-000001.json: " in line and "not a chunk record" in line for line in damaged), damaged


def test_a_published_run_is_never_written_again_but_a_retry_of_its_own_write_goes_on(tmp_path):
    rows = [row("a.png", 0.9), row("b.png", 0.1)]
    summary = RunSummary("r1", "v1", seconds=1.0, started_at="2026-12-07T01:00:00+00:00").tally(rows, CLASSES, 0.5)
    written = reports.write_outputs(str(tmp_path), rows, card(), summary)
    before = {uri: storage.read_bytes(uri) for uri in written.outputs.values()}
    # The artifacts or the lease failed after publishing, and the task is retried: the same write.
    again = reports.write_outputs(str(tmp_path), rows, card(), summary)
    assert again.to_dict() == written.to_dict()
    # Anyone else writing that run (another start, another recoverer, fewer rows) is refused.
    for other in (dataclasses.replace(summary, started_at="2026-12-07T02:00:00+00:00"),
                  dataclasses.replace(summary, recovered_by="r9")):
        with pytest.raises(reports.PublishedRunError, match="published already"):
            reports.write_outputs(str(tmp_path), rows[:1], card(), other)
    storage.write_bytes(written.outputs["summary.json"], b"{damaged")  # whatever it holds, it publishes the run
    with pytest.raises(reports.PublishedRunError, match="published already"):
        reports.write_outputs(str(tmp_path), rows[:1], card(), summary)
    assert {uri: storage.read_bytes(uri) for uri in written.outputs.values() if not uri.endswith("summary.json")} \
        == {uri: data for uri, data in before.items() if not uri.endswith("summary.json")}
