"""What report.html and the screening artifacts hold beside the rows: the model's own plots from its
bundle (checked against the card), a link to the model card and to the report (presigned on S3),
and the last runs' flag rate and rejected share, read from their summaries."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import urllib.request

import pytest

from model.bundle import file_digests
from model.plots import confusion_png, curves_png, roc_png
from screening import drift, reports
from screening.results import PROBABILITY_BINS, ResultsLayout, RunSummary
from store import registry, storage
from tests.test_results import CLASSES, card, row

MODEL = b"not really a model: the report never loads it"


def plots() -> dict[str, bytes]:
    return {"curves.png": curves_png({"stage1": {"loss": [0.9, 0.5], "val_loss": [1.0, 0.6], "accuracy": [0.6, 0.8],
                                                "val_accuracy": [0.5, 0.7]}}),
            "roc.png": roc_png([0.0, 0.2, 1.0], [0.0, 0.8, 1.0], 0.85, "covid", (0.8, 0.8)),
            "confusion.png": confusion_png([[5, 1], [2, 7]], CLASSES)}


def publish(store: str, files: dict[str, bytes], version: str = "v1"):
    """A bundle in the store as training publishes it; returns its card."""
    files = {"model.keras": MODEL, "card.md": f"# Model card of {version}\n".encode(), **files}
    bundle_card = card(version=version, model_sha256=hashlib.sha256(MODEL).hexdigest(), files=file_digests(files))
    registry.publish(store, version, files, bundle_card)
    return bundle_card


def screened(run_id: str, store: str = "", flagged: int = 1, clear: int = 3, rejected: int = 1):
    rows = ([row(f"{run_id}-f{i}.png", 0.9, run_id=run_id) for i in range(flagged)]
            + [row(f"{run_id}-c{i}.png", 0.1, run_id=run_id) for i in range(clear)]
            + [row(f"{run_id}-r{i}.png", None, run_id=run_id) for i in range(rejected)])
    return rows, RunSummary(run_id, "v1", model_store_uri=store, seconds=1.0).tally(rows, CLASSES, 0.5)


def write_run(results: str, run_id: str, bundle_card=None, store: str = "", **counts) -> tuple[RunSummary, str]:
    rows, summary = screened(run_id, store, **counts)
    summary = reports.write_outputs(results, rows, bundle_card or card(), summary)
    return summary, storage.read_bytes(summary.outputs["report.html"]).decode()


def embedded(page: str, png: bytes) -> bool:
    return f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page


# --- the model's plots and card --------------------------------------------------------------------------------------


def test_the_report_embeds_the_bundles_curves_roc_and_confusion_and_links_its_card(tmp_path):
    store, figures = str(tmp_path / "models"), plots()
    summary, page = write_run(str(tmp_path / "results"), "r1", publish(store, figures), store)

    for name, title in reports.MODEL_FIGURES.items():
        assert embedded(page, figures[name]) and f'alt="{title}"' in page, name
    assert "Not available" not in page
    assert f'<a href="file://{store}/v1/card.md">{store}/v1/card.md</a>' in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def test_a_bundle_without_plots_or_with_a_changed_one_shows_not_available(tmp_path, caplog):
    store, figures = str(tmp_path / "models"), plots()
    old = publish(store, {}, version="v1")  # a bundle from before the plots
    _, page = write_run(str(tmp_path / "results"), "r1", old, store)
    assert page.count("Not available") == 3 and "data:image/png" in page  # the histogram is still there

    changed = publish(store, figures, version="v2")
    storage.write_bytes(storage.join(store, "v2", "roc.png"), plots()["curves.png"])  # replaced after publishing
    with caplog.at_level(logging.WARNING, logger="screening.reports"):
        _, page = write_run(str(tmp_path / "results"), "r2", changed, store)
    assert page.count("Not available") == 1 and embedded(page, figures["curves.png"])
    assert not embedded(page, figures["roc.png"]) and page.count(base64.b64encode(figures["curves.png"]).decode()) == 1
    assert "roc.png of model v2 is left out of the report" in caplog.text and "damaged or was replaced" in caplog.text


def test_a_recovered_run_whose_store_is_gone_still_gets_its_report(tmp_path):
    store = str(tmp_path / "models")
    bundle_card = publish(store, plots())
    _, page = write_run(str(tmp_path / "results"), "r1", bundle_card, str(tmp_path / "moved-away"))
    assert page.count("Not available") == 3 and "Worklist" in page


def test_on_s3_the_card_link_is_presigned_and_opens_the_card(s3_bucket):
    store, results = f"{s3_bucket}/models", f"{s3_bucket}/results"
    bundle_card = publish(store, plots())
    _, page = write_run(results, "r1", bundle_card, store)

    href = page.split('<a href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert href.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in href and "X-Amz-Expires=604800" in href
    with urllib.request.urlopen(href, timeout=10) as response:
        assert response.read() == storage.read_bytes(f"{store}/v1/card.md")
    assert "(link valid until " in page and "Not available" not in page


def test_the_presigned_report_link_is_fetchable_over_http_and_returns_the_report(s3_bucket):
    summary, page = write_run(f"{s3_bucket}/results", "r1")
    link = reports.shared_link(summary.outputs["report.html"])
    assert link.expires_at.endswith("UTC") and reports._LINK.fullmatch(link.href)
    with urllib.request.urlopen(link.href, timeout=10) as response:
        assert response.read() == page.encode()
    with pytest.raises(ValueError, match="7 days"):
        storage.presigned_url(summary.outputs["report.html"], 8 * 24 * 3600)


def test_a_local_file_link_is_its_percent_encoded_file_uri_and_never_expires(tmp_path):
    link = reports.shared_link(str(tmp_path / "a b#c" / "report.html"))
    assert link.href == (tmp_path / "a b#c" / "report.html").as_uri() and "%20" in link.href and "%23" in link.href
    assert link.expires_at is None


# --- drift ----------------------------------------------------------------------------------------------------------


def test_the_summary_keeps_the_flag_rate_and_the_probability_histogram(tmp_path):
    summary, _ = write_run(str(tmp_path), "r1", flagged=2, clear=6, rejected=2)
    stored = json.loads(storage.read_bytes(summary.outputs["summary.json"]))
    assert stored["flag_rate"] == 0.25 and len(stored["probability_histogram"]) == PROBABILITY_BINS
    assert stored["probability_histogram"][18] == 2 and stored["probability_histogram"][2] == 6  # 0.9 and 0.1
    assert sum(stored["probability_histogram"]) == stored["ok"] == 8
    assert RunSummary.from_dict(stored) == summary
    edges = RunSummary("r", "v1").with_drift([row("one.png", 1.0), row("zero.png", 0.0)], "covid")
    assert edges.probability_histogram[0] == edges.probability_histogram[-1] == 1  # the last bin holds 1.0
    assert RunSummary("r", "v1").with_drift([row("bad.png", None)], "covid").flag_rate is None
    for bad in ([1] * (PROBABILITY_BINS - 1), [-1] * PROBABILITY_BINS, "20 counts"):
        with pytest.raises(ValueError, match="probability_histogram"):
            RunSummary.from_dict({**stored, "probability_histogram": bad})
    with pytest.raises(ValueError, match="flag_rate"):
        RunSummary.from_dict({**stored, "flag_rate": 1.5})


def test_the_drift_chart_appears_once_there_are_earlier_runs_and_old_summaries_still_read(tmp_path):
    results = str(tmp_path)
    _, first = write_run(results, "20261125T010000Z-aaaaaa")
    assert "No earlier runs with screened images to compare with yet." in first
    assert "flag rate and rejected" not in first

    old_uri = ResultsLayout(results).run("20261125T010000Z-aaaaaa").outputs["summary.json"]
    old = json.loads(storage.read_bytes(old_uri))
    del old["flag_rate"], old["probability_histogram"]  # as written before these fields existed
    storage.write_bytes(old_uri, json.dumps(old).encode())
    assert RunSummary.from_dict(old).flag_rate is None

    summary, page = write_run(results, "20261126T010000Z-bbbbbb", flagged=3, clear=1, rejected=0)
    assert 'alt="flag rate and rejected share of the last runs"' in page
    assert "This run: 75.0 % of the images screened ok were flagged, 0.0 % of the" in page
    assert "The 1 runs before it (median): 25.0 %" in page and "20.0 % rejected" in page  # the old one, from its counts


def test_damaged_old_summaries_are_skipped_and_logged_and_never_fail_the_report(tmp_path, caplog):
    results = str(tmp_path)
    write_run(results, "20261120T010000Z-aaaaaa")
    layout = ResultsLayout(results)
    storage.write_bytes(layout.run("20261121T010000Z-damage").outputs["summary.json"], b"\x00{not json")
    storage.write_bytes(layout.run("20261122T010000Z-nested").outputs["summary.json"], b"[" * 100_000)
    storage.write_bytes(layout.run("20261123T010000Z-schema").outputs["summary.json"],
                        json.dumps({"run_id": "20261123T010000Z-schema", "model_version": "v1",
                                    "flagged": -1}).encode())
    copied = json.loads(storage.read_bytes(layout.run("20261120T010000Z-aaaaaa").outputs["summary.json"]))
    storage.write_bytes(layout.run("20261124T010000Z-copied").outputs["summary.json"], json.dumps(copied).encode())
    storage.write_bytes(storage.join(layout.run("20261125T010000Z-runnin").folder, "parts", "chunk-000000.jsonl"), b"")
    storage.write_bytes(storage.join(results, "runs", "not a run id", "summary.json"), b"{}")

    with caplog.at_level(logging.WARNING, logger="screening.drift"):
        summary, page = write_run(results, "20261126T010000Z-bbbbbb")
    assert summary.damaged == 4 and len(summary.damaged_files) == 4  # counted and named in summary.json too

    assert "4 earlier run summaries could not be read and are left out" in page  # not the running one
    assert 'alt="flag rate and rejected share of the last runs"' in page  # the good one is on the chart
    for name in ("damage", "nested", "schema", "copied"):
        assert f"Z-{name}/summary.json: left off the drift chart" in caplog.text, name


def test_at_most_the_30_most_recent_runs_are_read(tmp_path, monkeypatch):
    results = str(tmp_path)
    runs = [f"202611{day:02d}T010000Z-{day:06d}" for day in range(1, 31)] + ["20261201T010000Z-later0"]
    for run_id in runs:
        rows, summary = screened(run_id)
        storage.write_bytes(ResultsLayout(results).run(run_id).outputs["summary.json"],
                            json.dumps(summary.with_drift(rows, "covid").to_dict()).encode())
    read, real = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a, **k: read.append(uri) or real(uri, *a, **k))

    _, current = screened("20261130T020000Z-tonite")
    history = drift.recent_runs(results, current)

    assert [rates.run_id for rates in history.runs] == runs[1:30] + ["20261130T020000Z-tonite"]  # none after it
    assert len(read) == drift.RECENT_RUNS - 1 and history.chart_png() is not None


def test_a_results_location_that_cannot_be_listed_shows_this_run_only(tmp_path):
    (tmp_path / "runs").write_bytes(b"a file where the runs folder should be")
    _, current = screened("r1")
    history = drift.recent_runs(str(tmp_path), current)
    assert history.runs == (drift.RunRates.of(current),) and history.problem and history.chart_png() is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_folders_are_listed_one_level_deep(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/results"
    for name in ("b/summary.json", "a/parts/chunk-000000.jsonl", "a/summary.json", "c.txt"):
        storage.write_bytes(storage.join(root, "runs", name), b"{}")
    assert storage.list_folders(storage.join(root, "runs")) == [storage.join(root, "runs", "a"),
                                                                  storage.join(root, "runs", "b")]
    assert storage.list_folders(storage.join(root, "nothing-yet"), missing_ok=True) == []


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_screening_run_links_its_report_and_shows_the_trained_models_plots_and_the_runs_before(model_store,
                                                                                                     tmp_path):
    from flows.parameters import ScreenParameters
    from flows.screen import screen
    from store.phantoms import write_phantom_dataset
    from tests.conftest import flow_run_artifacts

    results, incoming = str(tmp_path / "results"), str(tmp_path / "incoming")
    write_phantom_dataset(storage.join(incoming, "monday"), per_class=2, size=96, seed=1)
    screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=model_store))
    write_phantom_dataset(storage.join(incoming, "tuesday"), per_class=2, size=96, seed=2)
    state = screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=model_store),
                   return_state=True)
    summary = state.result()

    page = storage.read_bytes(summary.outputs["report.html"]).decode()
    version = summary.model_version
    bundle_card = registry.load_card(model_store, version)
    for name in reports.MODEL_FIGURES:  # the very bytes training wrote, as the card lists them
        assert embedded(page, registry.read_file(model_store, bundle_card, name)), name
    assert f'<a href="file://{model_store}/{version}/card.md">' in page and "Not available" not in page
    assert 'alt="flag rate and rejected share of the last runs"' in page and "The 1 runs before it" in page
    stored = json.loads(storage.read_bytes(summary.outputs["summary.json"]))
    assert sum(stored["probability_histogram"]) == stored["ok"] == 4

    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    report_uri = f"file://{summary.outputs['report.html']}"
    # Prefect keeps a link artifact as Markdown holding the one link.
    assert artifacts["screening-report"].data == f"[Report of screening run {summary.run_id}]({report_uri})"
    assert f"]({report_uri})" in artifacts["screening-summary"].data


@pytest.mark.slow
def test_on_s3_the_artifacts_name_the_report_and_a_link_is_made_only_on_demand(prefect_api, s3_bucket, monkeypatch):
    """Prefect keeps artifacts as long as runs: no bearer URL there. `cxr-screen report-link` makes a
    short-lived one when a person asks."""
    from prefect import flow
    from typer.testing import CliRunner

    from cli.main import app
    from tests.conftest import flow_run_artifacts

    rows, summary = screened("r1")
    summary = reports.write_outputs(f"{s3_bucket}/results", rows, card(), summary)

    @flow
    def publish() -> None:
        reports.publish_artifacts(summary, rows, card())

    state = publish(return_state=True)
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "screening-report" not in artifacts
    markdown = artifacts["screening-summary"].data
    assert f"Report: `{summary.outputs['report.html']}`" in markdown and "X-Amz-" not in markdown
    assert f"cxr-screen report-link {summary.run_id}" in markdown

    done = CliRunner().invoke(app, ["report-link", summary.run_id, "--results", f"{s3_bucket}/results",
                                    "--minutes", "5"])
    assert done.exit_code == 0, done.output
    link = done.stdout.strip().splitlines()[0]
    assert link.startswith("http://127.0.0.1:") and "X-Amz-Expires=300" in link
    with urllib.request.urlopen(link, timeout=10) as response:
        assert response.read() == storage.read_bytes(summary.outputs["report.html"])
    missing = CliRunner().invoke(app, ["report-link", "20990101T000000Z-000000", "--results", f"{s3_bucket}/results"])
    assert missing.exit_code == 3 and "no report there" in missing.output
