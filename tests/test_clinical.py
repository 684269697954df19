"""Clinical validity through the flows: strata from a manifest, the shortcut warning, calibration,
leaving a level out, balancing strata, the leave-one-level-out audit, and the promotion rule."""

from __future__ import annotations

import csv
import io

import pytest

from flows.parameters import AuditParameters, TrainParameters
from flows.train import train
from store import storage
from store.datasets import DatasetError
from store.phantoms import write_phantom_dataset
from tasks.promotion import promotion_decision

pytestmark = pytest.mark.slow

SMALL = dict(input_size=32, weights="none", epochs=12, augment_draws=1, batch_size=8, bootstrap=200)


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
    decision = promotion_decision({**clean.card.metrics["positive"], "within_auc": 1.0,
                                            "warnings": warned["warnings"]},
                                           {**clean.card.metrics["positive"], "within_auc": 0.5, "warnings": []})
    assert decision[0] is False and "shortcut warning" in decision[1]


def test_calibration_is_baked_into_the_saved_model_exactly(prefect_api):
    """What calibrate_model records is what the model then computes: softmax(log p / T + b)."""
    import numpy as np
    from prefect import flow

    from model.calibration import apply_temperature_and_bias
    from model.network import build_classifier
    from model.preprocessing import Preprocessing
    from model.training import predict_probabilities
    from store.datasets import LabelledImage
    from tasks.clinical import calibrate_model
    from tasks.train_data import LabelledArrays, TrainingSplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 30)
    spec = Preprocessing(input_size=32)
    model = build_classifier(2, 32, None, seed=1, head="linear", l2=1.0)
    model.get_layer("head").get_layer("standardise").adapt(rng.normal(size=(60, 512)))
    loaded = LabelledArrays(tuple(LabelledImage(f"/x/{i}.png", "covid" if y else "normal") for i, y in enumerate(labels)),
                            images, ())
    split = TrainingSplit(["non-covid", "covid"], "covid", labels, np.arange(0, 20), np.arange(20, 40), np.arange(40, 60))
    before = predict_probabilities(model, images, spec)

    @flow
    def calibrate():
        return calibrate_model(model, loaded, split, spec)

    found = calibrate()
    record, figure = found.record, found.figure
    assert figure.startswith(b"\x89PNG") and record["method"].startswith("temperature and class-bias")
    after = predict_probabilities(model, images, spec)
    expected = apply_temperature_and_bias(before, record["temperature"], np.array(record["bias"]))
    assert np.allclose(after, expected, atol=1e-5)
    assert record["validation"]["brier_after"] <= record["validation"]["brier_before"] + 1e-9
    assert set(record["test"]) == {"ece_before", "ece_after", "brier_before", "brier_after"}

    # Fitted on out-of-fold predictions instead: those images, not validation's, and the threshold
    # gets them back calibrated.
    rows = np.arange(0, 40)
    oof = np.clip(np.stack([1 - labels[rows] * 0.6 - 0.2, labels[rows] * 0.6 + 0.2], axis=1)
                  + rng.normal(scale=0.15, size=(40, 1)) * [1, -1], 0.01, 0.99)
    oof = oof / oof.sum(axis=1, keepdims=True)

    @flow
    def calibrate_out_of_fold():
        return calibrate_model(model, loaded, split, spec, (rows, oof))

    found = calibrate_out_of_fold()
    again, calibrated = found.record, found.oof
    assert again["fitted_on"] == "out_of_fold" and "out_of_fold" in again and "validation" not in again
    assert "out-of-fold predictions of the 40 training images" in again["method"]
    assert np.allclose(calibrated, apply_temperature_and_bias(oof, again["temperature"], np.array(again["bias"])))


def test_no_calibration_asked_means_none_recorded(prefect_api, tmp_path):
    dataset = str(tmp_path / "data")
    write_phantom_dataset(dataset, per_class=12, size=96, seed=5, source="independent")
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "raw"), calibrate=False,
                                    **SMALL))
    assert trained.card.calibration == {}
    assert "calibration.png" not in {storage.relative_to(u, trained.bundle_uri)
                                     for u in storage.list_files(trained.bundle_uri)}


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
