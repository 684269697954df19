"""Markup in any field that reaches report.html or a Markdown artifact stays text.

Every value is hostile at once here: file names, reasons, every card field the pages show, every
field of a run's summary (and so of a lease a later run recovers), the earlier runs on the drift
chart, the locations the card and report links are made from. The card and summaries are built
directly, past the checks that would refuse most of these on reading, so that the templates are
tested on their own.
"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from markupsafe import escape

from model.bundle import ModelCard
from screening import drift, reports
from screening.results import PredictionRow, RunSummary
from tasks.bundling import TrainedModel, card_markdown
from templates import render

ATTACKS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "javascript:alert(1)",
    # Backslashes that would turn a Markdown backslash escape off again, then a tag with an unquoted value.
    "\\\\<img src=x onerror=alert(1) x=\\\\>",
    "$x^{$ | [link](javascript:alert(1)) `code`\n# heading",  # TeX for matplotlib, Markdown syntax, a line break
]


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="  # 1x1


def hostile(field: str, attack: str) -> str:
    return f"{field}:{attack}"


def hostile_card(attack: str) -> ModelCard:
    h = lambda field: hostile(field, attack)  # noqa: E731
    return ModelCard(
        version="v1", classes=[h("class-a"), h("class-b")], positive_class=h("class-b"), threshold=0.5,
        preprocessing={"version": 1, "input_size": 32, "scale_mode": h("scale"), "interpolation": "area"},
        weights={"origin": h("weights")},
        dataset={"uri": h("dataset"), "fingerprint": h("fingerprint"), "images": h("images"), "split_seed": h("seed")},
        metrics={"positive": {"auc": h("auc"), "sensitivity_at_threshold": h("sensitivity"),
                              "specificity_at_threshold": h("specificity")},
                 "validation": {"target_sensitivity": h("target")}, "accuracy": h("accuracy")},
        validity={"warnings": [h("warning")],
                  "strata": {h("stratum"): {"within_auc": h("within"), "within_auc_ci": [h("low"), h("high")],
                                            "levels": [{"level": h("level"), "auc": h("level-auc")}]},
                             h("bare-stratum"): h("not-a-mapping")},
                  "left_out": {"variable": h("left-out"), "level": h("left-out-level")},
                  "masked": {"auc": h("masked-auc"), "method": h("mask-method")},
                  "gradcam": {"layer": h("layer"), "mean_lung_share": {h("class-b"): h("share")}}},
        calibration={"temperature": h("temperature"), "method": h("method"), "bias": [h("bias")],
                     "test": {"ece_after": h("ece")}, "validation": {"ece_after": h("validation-ece")}},
        promotion={"reason": h("promotion")}, model_sha256="0" * 64,
    )


def hostile_rows(attack: str, card: ModelCard) -> list[PredictionRow]:
    a, b = card.classes
    common = dict(sha256="ab" * 32, model_version="v1", screened_at="2026-11-27T00:00:00+00:00", run_id="r1")
    return [
        PredictionRow(image_uri=hostile("/in/flagged", attack), status="ok", reason="", predicted_class=b,
                      probabilities={a: 0.1, b: 0.9}, flagged=True, cam_lung_share=0.5, thumbnail="dGh1bWI=",
                      explanation="Y2Ft", **common),
        PredictionRow(image_uri=hostile("/in/clear", attack), status="ok", reason="", predicted_class=a,
                      probabilities={a: 0.8, b: 0.2}, flagged=False, **common),
        PredictionRow(image_uri=hostile("/in/rejected", attack), status="rejected", reason=hostile("reason", attack),
                      predicted_class="", probabilities={a: None, b: None}, flagged=False, **common),
    ]


def hostile_summary(attack: str, card: ModelCard, rows: list[PredictionRow], status: str,
                    model_store_uri: str) -> RunSummary:
    h = lambda field: hostile(field, attack)  # noqa: E731
    summary = RunSummary(
        run_id=h("run"), model_version="v1", model_store_uri=model_store_uri, incoming_uri=h("incoming"),
        flow_run_id=h("flow-run"), status=status, started_at=h("started"), finished_at=h("finished"), seconds=2.0,
        recovered_runs=[h("recovered-run")], last_seen_at=h("last-seen"), recovered_by=h("recovered-by"),
        recovered_at=h("recovered-at"), engine=h("engine"), engine_reason=h("engine-reason"),
        flag_rate=h("flag-rate"), probability_histogram=[h("bin")],
    ).tally(rows, card.classes, card.threshold)
    summary.outputs = {"report.html": h("report")}
    return summary


class Tags(HTMLParser):
    """Every tag and attribute a browser would build from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "strong", "div", "ul", "li",
             "table", "tr", "th", "td", "img", "a", "code"}


def assert_no_markup_from_values(page: str) -> None:
    assert "<script" not in page.lower() and "<svg" not in page.lower()
    parser = Tags()
    parser.feed(page)
    for tag, attributes in parser.tags:
        assert tag in PAGE_TAGS, tag
        assert not [name for name in attributes if name.startswith("on")], (tag, attributes)
        assert set(attributes) <= {"lang", "charset", "class", "src", "alt", "href"}, (tag, attributes)
        if "href" in attributes:
            assert attributes["href"].startswith("file:///"), attributes
        if "src" in attributes:
            assert attributes["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), attributes


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("status", ["abandoned", "<b>status</b>"])
@pytest.mark.parametrize("store", ["/models {attack}", "javascript:alert(1)", "javascript://%0aalert(1)"])
def test_no_field_of_card_summary_or_rows_becomes_markup_in_the_report(attack, status, store):
    card = hostile_card(attack)
    rows = hostile_rows(attack, card)
    summary = hostile_summary(attack, card, rows, status, store.format(attack=attack))
    earlier = hostile_summary(attack, card, rows[1:], "completed", store.format(attack=attack))
    earlier.flag_rate, earlier.ok = None, hostile("ok", attack)  # neither a rate nor a count
    history = drift.Drift((drift.RunRates.of(earlier), drift.RunRates.of(summary)),
                          damaged=(hostile("drift-a", attack), hostile("drift-b", attack)))
    summary.note_damage([hostile("stored-file", attack)])  # a damaged file's name is chosen by whoever wrote it
    summary.unsigned_warning = hostile("unsigned", attack)  # it names the model store location
    figures = dict.fromkeys(reports.MODEL_FIGURES, PNG)
    card_link = reports.shared_link(f"{summary.model_store_uri}/v1/card.md")
    page = reports.report_html(summary, rows, card, figures=figures, card_link=card_link, history=history)

    assert_no_markup_from_values(page)
    assert page.count(f'src="data:image/png;base64,{PNG}"') == 3 and 'alt="flag rate and rejected share' in page
    assert "2 earlier run summaries could not be read" in page and "Not available" not in page
    shown = ["run", "/in/flagged", "/in/rejected", "reason", "class-a", "class-b", "weights", "auc", "sensitivity",
             "specificity", "target", "warning", "stratum", "within", "temperature", "ece", "stored-file", "unsigned"]
    if status == "abandoned":
        shown += ["last-seen", "recovered-by"]
    for field in shown:  # each really reached the page, as text
        assert str(escape(hostile(field, attack))) in page, field
    assert str(escape(status)) in page
    assert "bare-stratum" in page and "n/a" in page  # a stratum that is not a mapping shows without its figures
    assert 'href="javascript' not in page and 'src="javascript' not in page


def test_a_local_store_becomes_a_percent_encoded_file_link_and_nothing_else_a_link():
    card = hostile_card(ATTACKS[1])
    rows = hostile_rows(ATTACKS[1], card)
    page = reports.report_html(hostile_summary("x", card, rows, "completed", '/models/"><b>'), rows, card)
    assert '<a href="file:///models/%22%3E%3Cb%3E/v1/card.md">' in page
    for store in ("s3://bucket/models", "javascript://x", ""):
        page = reports.report_html(hostile_summary("x", card, rows, "completed", store), rows, card)
        assert "<a " not in page


MARKDOWN_TAGS_OR_LINKS = ("<", "](", "`code`")


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_field_becomes_markup_in_the_markdown_artifacts(attack):
    card = hostile_card(attack)
    rows = hostile_rows(attack, card)
    summary = hostile_summary(attack, card, rows, hostile("status", attack), hostile("/models", attack))
    trained = TrainedModel(card, bundle_uri=hostile("bundle", attack), promoted=False, reason=hostile("reason", attack))
    pages = {
        "summary.md": render("summary.md.j2", summary=summary, card=card, disclaimer=reports.DISCLAIMER),
        "card.md": card_markdown(card),
        "training.md": render("training.md.j2", card=card, trained=trained, bundle_uri=trained.bundle_uri,
                              metrics=card.metrics, positive=card.metrics["positive"]),
    }
    for name, text in pages.items():
        for marker in MARKDOWN_TAGS_OR_LINKS:
            assert marker not in text, (name, marker)
        assert "\n# heading" not in text  # a line break in a value does not start a block
    assert "class-b:" in pages["summary.md"] or "run:" in pages["summary.md"]
    assert "warning:" in pages["card.md"] and "dataset:" in pages["card.md"] and "reason:" in pages["training.md"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_report_link_in_the_summary_artifact_is_the_only_link_and_percent_encoded(attack, tmp_path):
    card = hostile_card(attack)
    rows = hostile_rows(attack, card)
    summary = hostile_summary(attack, card, rows, "completed", "/models")
    summary.outputs = {"report.html": str(tmp_path / hostile("results", attack) / "report.html")}
    link = reports.shared_link(summary.outputs["report.html"])
    text = render("summary.md.j2", summary=summary, card=card, disclaimer=reports.DISCLAIMER, report_link=link)

    (line,) = [line for line in text.splitlines() if line.startswith("Report: [")]
    assert text.count("](") == 1 and line.endswith(f"]({link.href})")  # this code's link and no other
    assert link.href.startswith("file:///") and reports._LINK.fullmatch(link.href)
    assert "<" not in text and "`code`" not in text and "\n# heading" not in text
    for location in ("javascript:alert(1)", "javascript://x/report.html", "gs://bucket/report.html", ""):
        assert reports.shared_link(location) is None, location
