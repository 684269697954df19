"""The training flow end to end on small phantom datasets, on a folder and on a moto S3 server."""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np
import pytest

from flows.parameters import TrainParameters
from flows.train import train
from model.bundle import BundleError
from model.linear_head import C_GRID
from store import registry, storage
from store.datasets import LabelledImage, discover_dataset, fingerprint, hash_images
from store.phantoms import write_phantom_dataset
from tasks.promotion import promotion_decision
from tasks.train_data import class_layout
from tests.conftest import flow_run_artifacts

pytestmark = pytest.mark.slow

SMALL = dict(input_size=32, weights="none", epochs=3, augment_draws=2, batch_size=8)
BUNDLE_FILES = {"model.keras", "card.json", "card.md", "history.json", "curves.png", "confusion.png", "roc.png",
                "calibration.png", "gradcam.png", "engines.json", "model-int8.xml",
                "model-int8.bin", "scope.npz", "drift-reference.json"}


def bundle_files(bundle_uri: str) -> set[str]:
    return {storage.relative_to(uri, bundle_uri) for uri in storage.list_files(bundle_uri)}


def run(**parameters):
    state = train(TrainParameters(**parameters), return_state=True)
    return state.result(), state.state_details.flow_run_id


def test_train_on_a_folder_registers_promotes_and_reports(prefect_api, tmp_path):
    dataset_uri, store = str(tmp_path / "dataset"), str(tmp_path / "models")
    write_phantom_dataset(dataset_uri, per_class=16, size=96)
    result, flow_run_id = run(dataset_uri=dataset_uri, model_store_uri=store, **SMALL)

    assert result.promoted and "no comparable production model" in result.reason
    card = registry.load_card(store)
    # Calibration is skipped, with a warning, when a tiny validation split happens to be separable.
    assert bundle_files(result.bundle_uri) == BUNDLE_FILES - ({"calibration.png"} if not card.calibration else set())
    for plot in ("curves.png", "confusion.png", "roc.png", "gradcam.png"):
        assert storage.read_bytes(storage.join(result.bundle_uri, plot)).startswith(b"\x89PNG")
    assert registry.production_version(store) == result.version

    card = registry.load_card(store)
    assert card.classes == ["non-covid", "covid"] and card.positive_class == "covid"
    assert card.preprocessing == {"version": 1, "input_size": 32, "scale_mode": "unit", "interpolation": "area"}
    assert card.weights == {"origin": "none", "sha256": None}
    items = hash_images(discover_dataset(dataset_uri).items)
    assert card.dataset["fingerprint"] == fingerprint(items)
    assert card.dataset["train_images"] + card.dataset["validation_images"] + card.dataset["test_images"] == 32
    assert card.metrics["images"] == card.dataset["test_images"]
    assert 0.0 <= card.threshold <= 1.0 and card.threshold == result.card.threshold
    assert card.software["keras"] == keras.__version__
    model_bytes = storage.read_bytes(storage.join(result.bundle_uri, "model.keras"))
    assert card.model_sha256 == hashlib.sha256(model_bytes).hexdigest()
    history = json.loads(storage.read_bytes(storage.join(result.bundle_uri, "history.json")))
    # Stage 1 of the linear head is chosen by cross-validation: every candidate's out-of-fold scores
    # (class folders: one weighting, plain features, each C of the grid).
    searched = history["stage1"]["cross_validation"]
    assert len(searched) == len(C_GRID) and {row["features"] for row in searched} == {"plain"}
    chosen = card.training["head_selection"]["chosen"]
    assert chosen["cv_score"] == max(row["cv_score"] for row in searched) and chosen["folds"] >= 2
    assert card.validity["fitness"]["fit"] is True and "baseline" in card.validity

    model, loaded_card = registry.load_model(store)
    assert model.output_shape == (None, 2) and loaded_card == card
    assert card.validity["strata"] == {}  # class folders: no metadata to stratify by
    assert card.validity["masked"]["auc_lungs_blanked"] is not None or card.metrics["positive"]["auc"] is None
    text = storage.read_bytes(storage.join(result.bundle_uri, "card.md")).decode()
    assert f"# Model card: {card.version}" in text and "Intended use" in text and "Calibration" in text

    artifacts = flow_run_artifacts(flow_run_id)
    assert {"training-summary", "training-metrics", "training-progress", "model-card"} <= artifacts.keys()
    assert result.version in artifacts["training-summary"].data
    assert artifacts["training-progress"].data == pytest.approx(100.0)

    # Same data, same seed: the same model, which does not beat production. Forced, it does.
    again, _ = run(dataset_uri=dataset_uri, model_store_uri=store, **SMALL)
    assert not again.promoted and "does not beat production" in again.reason
    assert registry.production_version(store) == result.version
    assert registry.load_card(store, again.version).promotion["compared_with"] == result.version
    forced, _ = run(dataset_uri=dataset_uri, model_store_uri=store, force_promote=True, **SMALL)
    assert forced.promoted and registry.production_version(store) == forced.version
    pointer = json.loads(storage.read_bytes(storage.join(store, registry.PRODUCTION)))
    assert pointer["previous"] == result.version and pointer["reason"] == "promotion forced"
    assert registry.list_versions(store) == sorted([result.version, again.version, forced.version])

    # A damaged model file is refused on loading.
    storage.write_bytes(storage.join(forced.bundle_uri, "model.keras"), model_bytes)
    with pytest.raises(BundleError, match="damaged or was replaced"):
        registry.load_model(store)


def test_train_on_s3_multiclass_with_an_s3_weights_file(prefect_api, s3_bucket, tmp_path):
    dataset_uri, store = f"{s3_bucket}/cxr", f"{s3_bucket}/models"
    write_phantom_dataset(dataset_uri, per_class=10, size=96, classes=("normal", "covid"), seed=0)
    write_phantom_dataset(dataset_uri, per_class=10, size=96, classes=("viral", "bacterial"), seed=1)
    storage.write_bytes(f"{dataset_uri}/covid/broken.png", b"\x89PNG\r\n\x1a\n truncated")

    from model.network import build_base

    keras.utils.set_random_seed(3)
    weights_file = tmp_path / "vgg16.weights.h5"
    build_base(32, None).save_weights(weights_file)
    weights_uri = f"{s3_bucket}/weights/vgg16.weights.h5"
    storage.write_bytes(weights_uri, weights_file.read_bytes())

    result, _ = run(dataset_uri=dataset_uri, model_store_uri=store, multiclass=True,
                    **{**SMALL, "weights": weights_uri})
    assert result.bundle_uri.startswith(f"{store}/v")
    assert bundle_files(result.bundle_uri) == BUNDLE_FILES
    card = registry.load_card(store, result.version)  # tiny: a candidate, not fit for screening
    assert card.classes == ["bacterial", "covid", "normal", "viral"]
    assert card.weights == {"origin": weights_uri, "sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest()}
    ((rejected_uri, reason),) = card.dataset["rejected"]
    assert rejected_uri == f"{dataset_uri}/covid/broken.png" and "damaged PNG header" in reason
    assert card.dataset["images"] == 40
    assert set(card.metrics["per_class"]) == set(card.classes)
    assert np.array(card.metrics["confusion_matrix"]).shape == (4, 4)
    model, _ = registry.load_model(store, result.version)
    assert model.output_shape == (None, 4)


def test_fine_tuning_and_the_mlp_head_go_back_to_validation_beside_a_baseline(prefect_api, tmp_path):
    dataset_uri, store = str(tmp_path / "dataset"), str(tmp_path / "models")
    write_phantom_dataset(dataset_uri, per_class=16, size=96, seed=2)
    tuned, _ = run(dataset_uri=dataset_uri, model_store_uri=store, fine_tune_epochs=1, **SMALL)
    card = tuned.card
    # Stage 2 changed the features: the threshold (and calibration) come from validation again, and
    # cross-validation ran over the training part alone.
    assert card.metrics["validation"]["threshold_chosen_on"] == "the validation split"
    assert card.calibration.get("fitted_on", "validation") == "validation"
    history = json.loads(storage.read_bytes(storage.join(tuned.bundle_uri, "history.json")))
    assert "cross_validation" in history["stage1"] and len(history["stage2"]["loss"]) == 1
    assert card.training["head_selection"]["chosen"]["folds"] >= 2
    assert card.validity["baseline"]["overall"]["auc"] is not None and "against_baseline" in card.validity

    mlp, _ = run(dataset_uri=dataset_uri, model_store_uri=store, head="mlp", **SMALL)
    selection = mlp.card.training["head_selection"]
    assert "chosen" not in selection and selection["baseline"]["features"] == "plain"  # the card says what ran
    history = json.loads(storage.read_bytes(storage.join(mlp.bundle_uri, "history.json")))
    assert 1 <= len(history["stage1"]["loss"]) <= 3 and "val_loss" in history["stage1"]
    assert mlp.card.metrics["validation"]["threshold_chosen_on"] == "the validation split"


def test_offline_imagenet_fails_with_the_other_options_named(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils.urllib.request, "urlretrieve", offline)
    dataset_uri = str(tmp_path / "dataset")
    write_phantom_dataset(dataset_uri, per_class=8, size=64)
    with pytest.raises(Exception, match="--weights none"):
        train(TrainParameters(dataset_uri=dataset_uri, model_store_uri=str(tmp_path / "models"),
                              **{**SMALL, "weights": "imagenet"}))
    assert not storage.exists(str(tmp_path / "models" / registry.PRODUCTION))


def test_class_layout():
    items = tuple(LabelledImage(f"{c}/{i}.png", c) for c in ("covid", "normal", "viral") for i in range(2))
    classes, labels = class_layout(items, "covid", multiclass=False)
    assert classes == ["non-covid", "covid"] and labels.tolist() == [1, 1, 0, 0, 0, 0]
    classes, labels = class_layout(items, "covid", multiclass=True)
    assert classes == ["covid", "normal", "viral"] and labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="'pneumonia' is not among the classes found: covid, normal, viral"):
        class_layout(items, "pneumonia", multiclass=False)


def test_promotion_decision():
    better = {"auc": 0.9, "sensitivity_at_threshold": 0.95}
    worse = {"auc": 0.8, "sensitivity_at_threshold": 0.99}
    assert promotion_decision(better, worse)[0]
    assert not promotion_decision(worse, better)[0]
    tie_breaker = {"auc": 0.9, "sensitivity_at_threshold": 0.97}
    assert promotion_decision(tie_breaker, better)[0]
    assert not promotion_decision(better, better)[0]
    assert promotion_decision(worse, better, force=True) == (True, "promotion forced")
    assert promotion_decision(worse, None) == (True, "no comparable production model")

    # One place decides, in this order: not fit (never by training, forced or not), worse than its
    # baseline and experiments (only forced), require_approval (never), then the comparison.
    unfit = {"fit": False, "line": "NOT FIT FOR SCREENING: lower 95 % bound of AUC 0.540 (needs >= 0.750)"}
    promoted, reason = promotion_decision(better, None, force=True, fitness=unfit)
    assert not promoted and reason.startswith("NOT FIT FOR SCREENING") and "models promote" in reason
    below = {"worse": True, "reasons": ["AUC 0.800 is 0.100 below the plain baseline's 0.900 (margin 0.02)"]}
    promoted, reason = promotion_decision(better, None, fitness={"fit": True}, against_baseline=below)
    assert not promoted and reason.startswith("worse than its plain baseline: AUC 0.800")
    assert promotion_decision(better, None, True, against_baseline=below) == (True, "promotion forced")
    promoted, reason = promotion_decision(better, None, experiment="trained with site=b left out")
    assert not promoted and reason == "trained with site=b left out: an experiment, not a candidate"
    promoted, reason = promotion_decision(better, worse, require_approval=True)
    assert not promoted and "training recommends it: beats production" in reason


def test_validate_engines_rechecks_an_existing_version_on_its_own_test_split(prefect_api, tmp_path):
    from flows.validate_engines import validate_engines
    from store import engines

    dataset_uri, store = str(tmp_path / "dataset"), str(tmp_path / "models")
    write_phantom_dataset(dataset_uri, per_class=16, size=96, seed=4)
    result, _ = run(dataset_uri=dataset_uri, model_store_uri=store, **SMALL)
    card = registry.load_card(store, result.version)
    recorded = json.loads(storage.read_bytes(storage.join(result.bundle_uri, "engines.json")))
    for name in engines.ENGINE_FILES[:1] + engines.ENGINE_FILES[2:]:  # a version from before engines existed
        (tmp_path / "models" / card.version / name).unlink()
    assert engines.validated_engines(store, card)[0] == ["fp32"]

    checks = validate_engines(store, card.version)

    assert [check.engine for check in checks] == ["bf16", "int8"]
    again = json.loads(storage.read_bytes(storage.join(result.bundle_uri, "engines.json")))
    for engine in ("bf16", "int8"):  # the same test images as at training: the same figures
        for figure in ("images", "flag_agreement", "auc_difference"):
            assert again["checks"][engine][figure] == pytest.approx(recorded["checks"][engine][figure], abs=1e-3)
    allowed, _ = engines.validated_engines(store, card)
    assert allowed == ["fp32", *(check.engine for check in checks if check.passed)]

    # A dataset that changed since training cannot stand in for the version's test split.
    victim = next(iter(sorted((tmp_path / "dataset").rglob("*.png"))))
    victim.unlink()
    with pytest.raises(BundleError, match="not the one its card recorded"):
        validate_engines(store, card.version)


def test_a_dataset_outside_the_allowed_locations_is_refused_before_anything_is_read(prefect_api, tmp_path, s3_bucket):
    """An event names the dataset retrain reads (cxr.dataset.uri): with CXR_TRAIN_DATASET_PREFIXES,
    one elsewhere fails the run at once, and no model is trained, stored or signed."""
    from store.datasets import DatasetError

    write_phantom_dataset(str(tmp_path / "attacker" / "data"), per_class=4, size=64, seed=1)
    allowed = [str(tmp_path / "datasets"), s3_bucket + "/datasets"]
    for dataset in (str(tmp_path / "attacker" / "data"), str(tmp_path / "datasets" / ".." / "attacker" / "data"),
                    str(tmp_path / "datasets-evil"), s3_bucket + "/datasets-evil/x"):
        with pytest.raises(DatasetError, match="not under the dataset locations training may read"):
            train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), weights="none",
                                  dataset_prefixes=allowed))
    assert not (tmp_path / "models").exists()
    from store.datasets import require_allowed

    for dataset in (str(tmp_path / "datasets"), str(tmp_path / "datasets" / "2026-12"), s3_bucket + "/datasets/v2"):
        require_allowed(dataset, allowed)  # under an allowed location: no error
    require_allowed(str(tmp_path / "attacker"), None)  # no prefixes configured: anywhere
