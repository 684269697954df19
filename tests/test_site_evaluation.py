"""Site validation before serving: ``cxr-screen evaluate`` scores a labelled site dataset with a
stored version and keeps a signed evaluation beside it; ``models show`` lists it; with
CXR_REQUIRE_EVALUATION=true (or ``models promote --require-evaluation``) a version serves only after
a passing one. On a folder, on moto S3, and on real chest X-rays (the adults-only subset)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from model.bundle import signature_matches
from model.site_evaluation import compare_with_card, cross_fitted_baseline_auc
from store import evaluations, registry, storage
from store.phantoms import write_phantom_dataset
from tests.conftest import CXR, require_shared_data

KEY = "the site's signing key"


@pytest.fixture(scope="module")
def trained(trained_model, tmp_path_factory):
    """The session's model (it tells phantoms apart), signed and production in this module's own
    store, and a site of new phantoms of the size it was trained on."""
    root = tmp_path_factory.mktemp("site-evaluation")
    card = registry.load_card(trained_model.store, trained_model.version)  # unsigned: read before the key is set
    files = {name: storage.read_bytes(storage.join(trained_model.store, card.version, name)) for name in card.files}
    saved = os.environ.get(registry.SIGNING_KEY_VARIABLE)
    os.environ[registry.SIGNING_KEY_VARIABLE] = KEY
    store, version = str(root / "models"), card.version
    registry.publish(store, version, files, card)  # signed with the key
    registry.set_production(store, version, "the site evaluation tests' model")
    write_phantom_dataset(str(root / "site"), per_class=16, size=96, seed=12)
    yield {"store": store, "version": version, "site": str(root / "site"), "dataset": trained_model.dataset}
    if saved is None:
        os.environ.pop(registry.SIGNING_KEY_VARIABLE, None)
    else:
        os.environ[registry.SIGNING_KEY_VARIABLE] = saved


def copy_version(store: str, version: str, new: str, target: str | None = None) -> str:
    """The same bundle published again as another version (a version with no evaluation yet)."""
    card = registry.load_card(store, version)
    files = {name: storage.read_bytes(storage.join(store, version, name)) for name in card.files}
    registry.publish(target or store, new, files, dataclasses.replace(card, version=new))
    return new


@pytest.fixture
def command(monkeypatch):
    """Runs ``cxr-screen ARGS`` in this process (on the session's Prefect API); returns the result."""
    from cli import lifeline, main

    monkeypatch.setattr(lifeline, "arm", lambda: None)  # the watchdog is for a command line's own process

    def run(*args: str):
        try:
            result = CliRunner().invoke(main.app, list(args))
        finally:
            main.console.file = None  # --json sent it to that invocation's stderr
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return run


def evaluate(command, store: str, version: str, dataset: str, *options: str) -> dict:
    result = command("evaluate", dataset, "--model-store", store, "--model-version", version, "--bootstrap", "100",
                     "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def models(*args: str, store: str):
    from cli.models import models_app

    return CliRunner().invoke(models_app, [*args, "--model-store", store])


def test_an_evaluation_is_kept_signed_listed_and_bound_to_its_version(trained, command, tmp_path, caplog):
    store, site = trained["store"], trained["site"]
    version = copy_version(store, trained["version"], "v-evaluated")
    record = evaluate(command, store, version, site, "--output", str(tmp_path / "out"))

    assert record["model_version"] == version and record["images"] == 32 and record["dataset"]["uri"] == site
    assert record["verdict"]["fit"] is True, record["verdict"]
    card_json = storage.read_bytes(storage.join(store, version, "card.json"))
    assert record["model_card_sha256"] == hashlib.sha256(card_json).hexdigest()
    assert record["overall"]["auc"] > 0.9 and record["overall"]["auc_ci"][0] is not None
    assert record["operating_point"]["true_positives"] + record["operating_point"]["false_negatives"] == 16
    assert 0 <= record["calibration"]["ece"] <= 1 and len(record["calibration"]["reliability"]["images"]) == 10
    figures = {row["figure"]: row for row in record["comparison"]}
    assert figures["AUC"]["card_ci"] is not None and figures["AUC"]["where"] in ("inside", "below", "above")

    folder = storage.join(store, version, "evaluations", record["evaluation_id"])
    kept = {name: storage.read_bytes(storage.join(folder, name))
            for name in ("evaluation.json", "evaluation.json.sig", "evaluation.md", "reliability.png")}
    assert signature_matches(kept["evaluation.json"], kept["evaluation.json.sig"], KEY.encode())
    stored = json.loads(kept["evaluation.json"])
    assert stored["files"]["evaluation.md"] == hashlib.sha256(kept["evaluation.md"]).hexdigest()
    assert kept["reliability.png"].startswith(b"\x89PNG") and b"Site evaluation" in kept["evaluation.md"]
    assert sorted(os.listdir(tmp_path / "out")) == ["evaluation.json", "evaluation.md", "reliability.png"]
    assert (tmp_path / "out" / "evaluation.json").read_bytes() == kept["evaluation.json"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="store.registry"):
        registry.verify_bundle(store, version)
    assert "file manifest" not in caplog.text  # not stray files of the bundle: vouched for by their own record

    shown = models("show", version, "--json", store=store)
    assert shown.exit_code == 0, shown.output
    [row] = json.loads(shown.stdout)["evaluations"]
    assert (row["evaluation_id"], row["fit"], row["dataset_uri"], row["images"]) == (
        record["evaluation_id"], True, site, 32)
    assert row["dataset_fingerprint"] == record["dataset"]["fingerprint"]
    assert row["auc_ci"] == record["overall"]["auc_ci"]
    text = " ".join(models("show", version, store=store).stdout.split())
    assert record["evaluation_id"] in text and "fit" in text and record["dataset"]["fingerprint"][:12] in text

    # Moved to another version (same key, so its signature still matches): refused, naming the file.
    other = copy_version(store, trained["version"], "v-other")
    shutil.copytree(folder, storage.join(store, other, "evaluations", record["evaluation_id"]))
    [moved] = evaluations.list_evaluations(store, registry.load_card(store, other))
    assert not moved.fit and "moved or stale" in moved.problem and f"{other}/evaluations" in moved.problem

    # Changed after signing: refused, naming the file; models show says so and lists it as unusable.
    storage.write_bytes(storage.join(folder, "evaluation.json"),
                        kept["evaluation.json"].replace(b'"fit": true', b'"fit": false', 1))
    [found] = evaluations.list_evaluations(store, registry.load_card(store, version))
    assert not found.fit and "evaluation.json.sig" in found.problem and "does not match" in found.problem
    [row] = json.loads(models("show", version, "--json", store=store).stdout)["evaluations"]
    assert row["fit"] is False and "evaluation.json" in row["problem"]
    with pytest.raises(evaluations.EvaluationRequired, match="cannot be used"):
        evaluations.require_passing(store, registry.load_card(store, version))


@pytest.mark.parametrize("body, words", [
    (b'{"images": ' + b"9" * 5000 + b"}", "(5000 characters) is beyond +-2**53"),  # more digits than Python converts
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),  # model.stored_json's bounds
    (b"\xff\xfe not text", "not a valid evaluation"),  # not UTF-8: UnicodeDecodeError
    (None, "its figures say"),  # a verdict that does not follow from the figures
    (None, "1e400"),  # an integer too large for a float among the figures
])
def test_a_hostile_evaluation_file_gives_a_clean_refusal(trained, monkeypatch, body, words):
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE)  # what the content checks meet where nothing is signed
    store = trained["store"]
    card = registry.load_card(store, trained["version"])
    digest = evaluations.card_sha256(store, card.version)
    record = {"evaluation_id": "e20261206-000000-000000", "model_version": card.version, "model_card_sha256": digest,
              "created_at": "2026-12-06T00:00:00+00:00", "dataset": {"uri": "/site", "fingerprint": "f" * 64},
              "images": 10, "threshold": 0.5, "overall": {"auc": 0.9, "auc_ci": [0.8, 0.95], "sensitivity": 0.95,
                                                          "specificity": 0.9, "specificity_ci": [0.8, 0.95]},
              "verdict": {"fit": False, "criteria": {}}}
    if words == "1e400":
        record["overall"]["auc_ci"] = [10 ** 400, 1]
        words = "(401 characters) is beyond +-2**53"
    body = body or json.dumps(record).encode()
    folder = evaluations.evaluation_folder(store, card.version, record["evaluation_id"])
    storage.write_bytes(storage.join(folder, "evaluation.json"), body)
    try:
        found = evaluations.read_evaluation(store, card, digest, record["evaluation_id"])
        assert not found.fit and "evaluation.json" in found.problem and words in found.problem, found.problem
    finally:
        shutil.rmtree(folder)


def test_serving_waits_for_a_passing_evaluation(trained, command, monkeypatch, tmp_path):
    store, site, version = trained["store"], trained["site"], trained["version"]
    incoming = str(tmp_path / "incoming")
    write_phantom_dataset(incoming, per_class=2, size=128, seed=40)
    screen = ("screen", incoming, "--results", str(tmp_path / "results"), "--model-store", store, "--explain", "none")
    monkeypatch.setenv(evaluations.REQUIRE_VARIABLE, "true")

    refused = command(*screen)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 3, refused.output
    assert f"model {version} has no site evaluation" in text and f"--model-version {version}" in text

    # A site where the model fails (its 'covid' folder holds healthy phantoms): nothing unlocks.
    failing_site = tmp_path / "failing-site"
    write_phantom_dataset(str(failing_site), per_class=16, size=128, seed=41)
    shutil.rmtree(failing_site / "covid")
    write_phantom_dataset(str(tmp_path / "healthy"), per_class=16, size=128, seed=42)
    (tmp_path / "healthy" / "normal").rename(failing_site / "covid")
    failing = evaluate(command, store, version, str(failing_site))
    assert failing["verdict"]["fit"] is False
    refused = command(*screen)
    assert refused.exit_code == 3 and "NOT FIT FOR SCREENING" in refused.output, refused.output

    assert evaluate(command, store, version, site)["verdict"]["fit"] is True
    served = command(*screen)
    assert served.exit_code == 0, served.output
    assert "Screened 4 new image(s)" in " ".join(served.output.split())

    monkeypatch.setenv(evaluations.REQUIRE_VARIABLE, "false")
    candidate = copy_version(store, version, "v-candidate")
    promote = ("promote", candidate, "--reason", "validated on site A", "--require-evaluation")
    refused = models(*promote, store=store)
    assert refused.exit_code == 3 and "no site evaluation" in refused.output
    assert "--require-evaluation" in refused.output
    assert registry.production_version(store) == version
    evaluate(command, store, candidate, site)
    accepted = models(*promote, store=store)
    assert accepted.exit_code == 0, accepted.output
    assert registry.production_version(store) == candidate

    monkeypatch.setenv(evaluations.REQUIRE_VARIABLE, "true")  # the setting alone asks promote for one too
    unevaluated = copy_version(store, version, "v-unevaluated")
    refused = models("promote", unevaluated, "--reason", "no flag", store=store)
    assert refused.exit_code == 3 and "CXR_REQUIRE_EVALUATION is set" in " ".join(refused.output.split())
    monkeypatch.setenv(evaluations.REQUIRE_VARIABLE, "ture")
    assert command(*screen).exit_code == 3  # a setting that is neither true nor false stops, never passes


def test_evaluation_on_s3_with_its_prefect_artifact(trained, s3_bucket):
    from flows.evaluate import evaluate as evaluate_flow
    from flows.parameters import EvaluateParameters
    from tests.conftest import flow_run_artifacts

    store, site = f"{s3_bucket}/models", f"{s3_bucket}/site"
    version = copy_version(trained["store"], trained["version"], "v-s3", target=store)
    for uri in storage.list_files(trained["site"]):
        storage.write_bytes(storage.join(site, storage.relative_to(uri, trained["site"])), storage.read_bytes(uri))
    state = evaluate_flow(EvaluateParameters(dataset_uri=site, model_store_uri=store, model_version=version,
                                             output_uri=f"{s3_bucket}/reports", bootstrap=100), return_state=True)
    record = state.result().record
    assert record["verdict"]["fit"] is True and record["images"] == 32
    artifact = flow_run_artifacts(state.state_details.flow_run_id)["site-evaluation"]
    assert record["evaluation_id"] in artifact.data and "Against the card's test figures" in artifact.data
    folder = storage.join(store, version, "evaluations", record["evaluation_id"])
    data = storage.read_bytes(storage.join(folder, "evaluation.json"))
    assert signature_matches(data, storage.read_bytes(storage.join(folder, "evaluation.json.sig")), KEY.encode())
    assert storage.read_bytes(f"{s3_bucket}/reports/evaluation.json") == data
    assert storage.exists(f"{s3_bucket}/reports/reliability.png")
    [found] = evaluations.list_evaluations(store, registry.load_card(store, version))
    assert found.fit and found.record["dataset"]["uri"] == site
    passing = evaluations.require_passing(store, registry.load_card(store, version))
    assert passing.evaluation_id == record["evaluation_id"]


def test_real_adults_only_subset_and_the_models_own_data(trained, command, tmp_path):
    """The case to watch on the shared data: adults only, where age cannot stand in for disease."""
    source = require_shared_data(CXR)
    with open(source / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    adults = [row for row in rows if row["age_group"] == "adult"]
    chosen = ([row for row in adults if row["class"] != "covid"]
              + [row for row in adults if row["class"] == "covid"][:40]
              + [row for row in rows if row["age_group"] == "paediatric"][:20])
    site = tmp_path / "site"
    for row in chosen:
        (site / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / row["file"], site / row["file"])
    with open(site / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(chosen)

    record = evaluate(command, trained["store"], trained["version"], str(site), "--where", "age_group=adult",
                      "--min-auc", "1.0")
    adult_rows = [row for row in chosen if row["age_group"] == "adult"]
    assert record["images"] == len(adult_rows) and record["dataset"]["where"] == ["age_group=adult"]
    assert record["dataset"]["labels"]["covid"] == 40
    assert "age_group" not in record["strata"]  # one level left: nothing to stratify by
    assert {"source_dataset", "view"} <= set(record["strata"])
    for found in record["strata"].values():
        assert "cross-fitted" in found["metadata_baseline_method"]
        assert sum(level["images"] for level in found["levels"]) == record["images"]
    assert record["verdict"]["fit"] is False and "AUC" in record["verdict"]["reasons"][0]
    assert not record["dataset"]["held_out_only"]

    # The model's own training data: only the images it never learned from are scored, and it says so.
    own = evaluate(command, trained["store"], trained["version"], trained["dataset"])
    card = registry.load_card(trained["store"], trained["version"])
    assert own["dataset"]["held_out_only"] and own["images"] == card.metrics["images"]
    assert "trained on" in own["warnings"][0]

    unknown = command("evaluate", str(site), "--model-store", trained["store"], "--where", "age_group=elderly")
    assert unknown.exit_code == 3 and "no level 'elderly'" in unknown.output, unknown.output


def test_cross_fitted_baseline_and_the_comparison():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(bool)
    patients = [f"p{index // 2}" for index in range(200)]
    assert cross_fitted_baseline_auc(np.where(labels, "adult", "child"), labels, patients) == 1.0
    independent = cross_fitted_baseline_auc(rng.choice(["a", "b"], 200), labels, patients)
    assert independent is not None and independent < 0.65
    assert cross_fitted_baseline_auc(["a"] * 4, [True, False, True, False], ["p"] * 4) is None  # one patient

    figures = {"overall": {"auc": 0.70, "sensitivity": 0.99, "specificity": 0.5},
               "strata": {"site": {"within_auc": 0.6}}, "calibration": {"ece": 0.1}}
    card = {"overall": {"auc": 0.9, "auc_ci": [0.85, 0.95], "sensitivity": 0.95, "sensitivity_ci": [0.9, 0.98],
                        "specificity": 0.5, "specificity_ci": [0.4, 0.6]},
            "strata": {"site": {"within_auc": 0.62, "within_auc_ci": [0.5, 0.7]}}}
    rows = {row["figure"]: row for row in compare_with_card(figures, card, {}, {"test": {"ece_after": 0.05}})}
    assert (rows["AUC"]["where"], rows["AUC"]["inside"]) == ("below", False)
    assert rows["sensitivity at the threshold"]["where"] == "above"
    assert rows["specificity at the threshold"]["inside"] is True and rows["AUC within site"]["inside"] is True
    assert rows["ECE"]["inside"] is None and rows["ECE"]["card"] == 0.05

