"""Clinical validity through the flows: strata from a manifest, the shortcut warning, calibration,
leaving a level out, balancing strata, the leave-one-level-out audit, and the promotion rule."""

from __future__ import annotations

import csv
import io

import pytest

from flows.parameters import AuditParameters, TrainParameters
from flows.train import train
from tasks import registry, storage
from tasks.datasets import DatasetError
from tasks.phantoms import write_phantom_dataset

pytestmark = pytest.mark.slow

SMALL = dict(input_size=64, weights="none", epochs=12, augment_draws=1, batch_size=8, bootstrap=200)


def test_the_shortcut_warning_fires_when_the_source_gives_the_label_away(prefect_api, tmp_path):
    dataset = str(tmp_path / "shortcut")
    write_phantom_dataset(dataset, per_class=24, size=96, seed=3, source="label", marker_for="covid")
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), **SMALL))
    card = trained.card
    assert list(card.validity["strata"]) == ["source"]  # found in the manifest by default
    found = card.validity["strata"]["source"]
    assert found["metadata_baseline_auc"] == pytest.approx(1.0)
    assert found["within_auc"] is None  # each level holds one class: nothing to compare within
    assert any("predictable from source alone" in line for line in card.shortcut_warnings)
    text = storage.read_bytes(storage.join(trained.bundle_uri, "card.md")).decode()
    assert "Shortcut warning" in text and "By source" in text


def test_no_warning_where_the_source_says_nothing_and_a_model_with_one_is_not_promoted_over_it(prefect_api, tmp_path):
    store = str(tmp_path / "models")
    fair = str(tmp_path / "fair")
    write_phantom_dataset(fair, per_class=30, size=96, seed=4, source="independent", marker_for="site-a")
    clean = train(TrainParameters(dataset_uri=fair, model_store_uri=store, **SMALL))
    found = clean.card.validity["strata"]["source"]
    assert clean.card.shortcut_warnings == [], clean.card.validity
    assert found["metadata_baseline_auc"] == pytest.approx(0.5, abs=0.2)
    assert found["within_auc"] == pytest.approx(clean.card.metrics["positive"]["auc"], abs=0.1)
    low, high = found["within_auc_ci"]
    assert low <= found["within_auc"] <= high
    assert {level["level"] for level in found["levels"]} == {"site-a", "site-b"}
    assert clean.card.validity["overall"]["auc"] == pytest.approx(clean.card.metrics["positive"]["auc"])
    assert clean.promoted

    # A later model that carries a warning never replaces one that does not, unless forced.
    warned = clean.card.validity | {"warnings": ["the label is predictable from source alone"]}
    decision = registry.promotion_decision({**clean.card.metrics["positive"], "within_auc": 1.0,
                                            "warnings": warned["warnings"]},
                                           {**clean.card.metrics["positive"], "within_auc": 0.5, "warnings": []})
    assert decision[0] is False and "shortcut warning" in decision[1]


def test_calibration_is_baked_in_and_the_threshold_uses_it(prefect_api, tmp_path):
    dataset = str(tmp_path / "data")
    write_phantom_dataset(dataset, per_class=20, size=96, seed=5, source="independent")
    store = str(tmp_path / "models")
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=store, **SMALL))
    calibration = trained.card.calibration
    assert calibration["temperature"] > 0 and set(calibration["test"]) == {"ece_before", "ece_after", "brier_before",
                                                                           "brier_after"}
    model, card = registry.load_model(store)
    # The saved model gives the calibrated probabilities: the card's threshold reproduces its test figures.
    import numpy as np

    from model.training import predict_probabilities
    from tasks.loading import load_images

    uris = sorted(storage.list_files(dataset, {".png"}))
    images = np.stack([image.pixels for image in load_images(uris, card.spec())])
    probabilities = predict_probabilities(model, images, card.spec())
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    uncalibrated = train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "raw"), calibrate=False,
                                         **SMALL))
    assert uncalibrated.card.calibration == {}
    assert uncalibrated.card.metrics["positive"]["auc"] == pytest.approx(card.metrics["positive"]["auc"], abs=1e-6)


def test_leave_out_and_balance_strata(prefect_api, tmp_path):
    dataset = str(tmp_path / "data")
    write_phantom_dataset(dataset, per_class=24, size=96, seed=6, source="independent")
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"),
                                    leave_out="source=site-b", balance_strata="source", **SMALL))
    left = trained.card.validity["left_out"]
    assert (left["variable"], left["level"], left["images"], left["positives"]) == ("source", "site-b", 24, 12)
    assert left["auc"] is not None
    assert trained.card.dataset["test_images"] + trained.card.dataset["train_images"] \
        + trained.card.dataset["validation_images"] == 24  # site-b took no part in training or testing
    assert trained.card.training["leave_out"] == "source=site-b" and trained.card.training["balance_strata"] == "source"

    with pytest.raises(DatasetError, match="no manifest column 'hospital'.*columns: source"):
        train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), strata=["hospital"],
                              **SMALL))
    with pytest.raises(DatasetError, match="source has no level 'site-z'"):
        train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"),
                              leave_out="source=site-z", **SMALL))


def test_the_audit_leaves_each_level_out_once(prefect_api, tmp_path):
    from flows.audit import audit

    dataset = str(tmp_path / "data")
    write_phantom_dataset(dataset, per_class=20, size=96, seed=7, source="independent")
    result = audit(AuditParameters(dataset_uri=dataset, by="source", output_uri=str(tmp_path / "audit"),
                                   **{**SMALL, "epochs": 4}))
    assert [fold["level"] for fold in result.folds] == ["site-a", "site-b"]
    assert all(fold["images"] == 20 and fold["positives"] == 10 for fold in result.folds)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(result.outputs["table.csv"]).decode())))
    assert [row["level"] for row in rows] == ["site-a", "site-b"]
    assert storage.read_bytes(result.outputs["plot.png"]).startswith(b"\x89PNG")
    with pytest.raises(DatasetError, match="no manifest column 'site'"):
        audit(AuditParameters(dataset_uri=dataset, by="site", output_uri=str(tmp_path / "audit"), **SMALL))
