"""model/ alone: the network, cached-feature training, preprocessing, evaluation, the bundle."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.augmentation import Augmentation, build_augmentation
from model.bundle import BundleError, ModelCard, model_from_bytes, model_to_bytes
from model.evaluation import auc, choose_threshold, evaluate, flags, predict_classes, sensitivity_specificity
from model.network import WeightsUnavailable, build_base, build_classifier, build_head
from model.preprocessing import Preprocessing, preprocess, resize, scale
from model.training import (
    TrainingConfig,
    TrainingData,
    _image_dataset,
    extract_features,
    fit_head_cached,
    fit_naive_frozen,
    predict_probabilities,
)


def images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# --- the head -------------------------------------------------------------------------------


def _cells_reaching_output(head: keras.Model, feature_shape) -> np.ndarray:
    features = tf.Variable(np.random.default_rng(0).uniform(0.5, 1.5, (1, *feature_shape)).astype(np.float32))
    with tf.GradientTape() as tape:
        output = head(features, training=False)[0, 0]
    gradient = tape.gradient(output, features).numpy()[0]
    return np.abs(gradient).sum(axis=-1) > 0


def test_every_cell_of_the_7x7_feature_map_reaches_the_output():
    keras.utils.set_random_seed(0)
    reached = _cells_reaching_output(build_head((7, 7, 512), 2, kind="mlp"), (7, 7, 512))
    assert reached.shape == (7, 7) and reached.all()


def test_the_tutorial_head_would_fail_the_coverage_test():
    """The check above can fail: AveragePooling2D((4, 4)) on 7x7 reads only the top-left 4x4 cells."""
    features = keras.Input((7, 7, 512))
    x = keras.layers.Flatten()(keras.layers.AveragePooling2D((4, 4))(features))
    tutorial = keras.Model(features, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(64, "relu")(x)))
    reached = _cells_reaching_output(tutorial, (7, 7, 512))
    assert reached[:4, :4].all() and not reached[4:, :].any() and not reached[:, 4:].any()


def test_classifier_structure_and_frozen_base():
    model = build_classifier(4, input_size=64, weights=None, head="mlp")
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 4)
    assert not model.get_layer("vgg16").trainable
    head_layers = [layer.name for layer in model.get_layer("head").layers]
    assert head_layers == ["features", "pool", "normalise", "dense", "dropout", "probabilities"]
    assert model.get_layer("head").get_layer("dense").units == 64


def test_random_base_gives_features_of_order_one():
    keras.utils.set_random_seed(0)
    features = build_base(64, None)(images(4, 64).astype(np.float32) / 255.0).numpy()
    assert 0.05 < features.mean() < 20


def test_offline_imagenet_names_the_other_two_options(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached copy to fall back on
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    # This machine has no internet either way; forcing the failure keeps the test the same where it has.
    monkeypatch.setattr(file_utils.urllib.request, "urlretrieve", offline)
    with pytest.raises(WeightsUnavailable) as caught:
        build_base(32, "imagenet")
    message = str(caught.value)
    assert "--weights PATH_OR_URI" in message and "--weights none" in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message


def test_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(1)
    source = build_base(32, None)
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(2)
    loaded = build_base(32, str(path))
    x = images(2, 32).astype(np.float32) / 255
    np.testing.assert_allclose(loaded(x).numpy(), source(x).numpy(), atol=1e-6)
    with pytest.raises(WeightsUnavailable, match="not a VGG16"):
        (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
        build_base(32, str(tmp_path / "junk.weights.h5"))


# --- cached features vs naive training -------------------------------------------------------


@pytest.mark.parametrize("scale_mode", ["unit", "caffe"])
def test_cached_features_equal_the_naive_pipelines_features(scale_mode):
    spec = Preprocessing(input_size=64, scale_mode=scale_mode)
    keras.utils.set_random_seed(0)
    model = build_classifier(2, 64, None, head="mlp")
    base, head = model.get_layer("vgg16"), model.get_layer("head")
    x, y = images(10, 64), np.array([0, 1] * 5)
    cached = extract_features(base, x, spec, None, batch_size=4)
    naive_batches = _image_dataset(x, y, 2, spec, 4, None, None, seed=0)
    naive = np.concatenate([base(batch, training=False).numpy() for batch, _ in naive_batches])
    np.testing.assert_allclose(cached, naive, atol=1e-5)
    # The head on cached features is the classifier on images.
    np.testing.assert_allclose(head(cached).numpy(), predict_probabilities(model, x, spec, 4), atol=1e-5)


def test_augmented_draws_match_the_same_augmentation_applied_in_the_model():
    spec = Preprocessing(input_size=64)
    keras.utils.set_random_seed(0)
    base = build_classifier(2, 64, None, head="mlp").get_layer("vgg16")
    x = images(6, 64)
    cached = extract_features(base, x, spec, build_augmentation(Augmentation(), seed=5), batch_size=3)
    again = build_augmentation(Augmentation(), seed=5)
    naive = np.concatenate([base(again(tf.constant(b, tf.float32) / 255.0, training=True)).numpy() for b in (x[:3], x[3:])])
    np.testing.assert_allclose(cached, naive, atol=1e-5)
    assert not np.allclose(cached, extract_features(base, x, spec, None, batch_size=3), atol=1e-3)


def test_both_training_paths_learn_a_separable_problem():
    """Bright vs dark images: both stage-1 paths must get the validation set right."""
    spec = Preprocessing(input_size=32)
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 90, (24, 32, 32, 3), dtype=np.uint8)
    bright = rng.integers(160, 256, (24, 32, 32, 3), dtype=np.uint8)
    x, y = np.concatenate([dark, bright]), np.array([0] * 24 + [1] * 24)
    order = rng.permutation(48)
    x, y = x[order], y[order]
    data = TrainingData(x[:36], y[:36], x[36:], y[36:], 2)
    config = TrainingConfig(epochs=30, batch_size=8, augment=False, patience=30, learning_rate=1e-2)
    for fit in (fit_head_cached, fit_naive_frozen):
        keras.utils.set_random_seed(0)
        model = build_classifier(2, 32, None, head="mlp")
        history = fit(model, data, spec, config)
        assert len(history["loss"]) >= 1
        predicted = predict_probabilities(model, data.x_val, spec).argmax(axis=1)
        assert (predicted == data.y_val).mean() == 1.0, fit.__name__


# --- preprocessing ----------------------------------------------------------------------------


def test_preprocess_is_resize_then_unit_scale():
    image = images(1, 300)[0][:, :200]
    spec = Preprocessing(input_size=64)
    out = preprocess(image, spec)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_allclose(out, resize(image, spec) / 255.0, atol=1e-7)


def test_caffe_mode_matches_keras_vgg16_preprocess_input():
    image = images(1, 64)[0]
    spec = Preprocessing(input_size=64, scale_mode="caffe")
    expected = keras.applications.vgg16.preprocess_input(image.astype(np.float32)[None])[0]
    np.testing.assert_allclose(preprocess(image, spec), expected, atol=1e-3)
    np.testing.assert_allclose(scale(image[None] / 255.0, spec)[0], expected, atol=1e-3)


def test_preprocessing_round_trips_and_refuses_unknown():
    spec = Preprocessing(input_size=128, scale_mode="caffe")
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        Preprocessing.from_dict({**spec.to_dict(), "version": 2})
    with pytest.raises(ValueError, match="scale_mode"):
        Preprocessing(scale_mode="imagenet")


# --- evaluation -------------------------------------------------------------------------------


def test_threshold_reaches_the_target_sensitivity_with_the_best_specificity():
    rng = np.random.default_rng(0)
    positive = np.array([1] * 40 + [0] * 60, bool)
    scores = np.where(positive, rng.uniform(0.3, 1.0, 100), rng.uniform(0.0, 0.6, 100))
    threshold = choose_threshold(positive, scores, 0.95)
    sensitivity, specificity = sensitivity_specificity(positive, scores >= threshold)
    assert sensitivity >= 0.95
    # No threshold that keeps the target has a better specificity on these images...
    for candidate in np.unique(scores):
        candidate_sensitivity, candidate_specificity = sensitivity_specificity(positive, scores >= candidate)
        if candidate_sensitivity >= 0.95:
            assert candidate_specificity <= specificity
    # ...and it lies strictly between two observed scores, not on one.
    assert threshold not in set(scores.tolist())
    lowest_flagged = np.sort(scores[positive])[::-1][int(np.ceil(0.95 * 40)) - 1]
    assert scores[scores < lowest_flagged].max() < threshold < lowest_flagged


def test_evaluate_reports_what_the_card_needs():
    classes = ["bacterial", "covid", "normal"]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    probabilities = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.5, .4, .1],
                              [.1, .1, .8], [.2, .1, .7], [.1, .3, .6]])
    metrics = evaluate(labels, probabilities, classes, "covid", threshold=0.5)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 3]]
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["per_class"]["covid"]["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["covid"]["specificity"] == pytest.approx(4 / 5)
    assert metrics["positive"]["sensitivity_at_threshold"] == pytest.approx(2 / 3)  # 0.8, 0.6 >= 0.5
    assert metrics["positive"]["specificity_at_threshold"] == pytest.approx(4 / 5)  # 0.7 >= 0.5
    for key in ("macro avg", "weighted avg", "covid"):
        assert {"precision", "recall", "f1-score", "support"} <= metrics["classification_report"][key].keys()
    assert 0 <= metrics["positive"]["auc"] <= 1


def test_an_image_at_the_threshold_is_flagged():
    threshold = 0.25  # exact in binary, so p == threshold holds exactly
    assert flags([0.0, 0.2499, 0.25, 0.2501, 1.0, float("nan")], threshold).tolist() == [False, False, True, True, True, False]
    probabilities = np.array([[0.75, 0.25], [0.76, 0.24]])
    assert predict_classes(probabilities, ["normal", "covid"], "covid", threshold).tolist() == [1, 0]  # the same rule


def test_auc_equals_scikit_learns_and_is_none_with_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    is_positive = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + is_positive * 0.3, 1)  # rounded: many ties
    assert auc(is_positive, scores) == pytest.approx(roc_auc_score(is_positive, scores), abs=1e-12)
    assert auc(is_positive.astype(int), scores) == auc(is_positive, scores)  # 1/0 labels as booleans
    assert auc([True, True, True], [0.1, 0.5, 0.9]) is None
    assert auc([False, False], [0.1, 0.5]) is None
    assert auc([], []) is None
    with pytest.raises(ValueError, match="finite"):
        auc([True, False], [0.5, float("nan")])
    with pytest.raises(ValueError, match="labels"):
        auc([True, False], [0.5])


# --- the bundle -------------------------------------------------------------------------------


def _card(model_bytes: bytes, **changes) -> ModelCard:
    import hashlib

    card = ModelCard(version="v1", classes=["non-covid", "covid"], positive_class="covid", threshold=0.4,
                     preprocessing=Preprocessing(input_size=32).to_dict(), weights={"origin": "none"},
                     dataset={}, metrics={}, model_sha256=hashlib.sha256(model_bytes).hexdigest())
    return dataclasses.replace(card, **changes)


def test_bundle_round_trip_predicts_the_same(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_classifier(2, 32, None, head="mlp")
    data = model_to_bytes(model)
    card = _card(data)
    assert ModelCard.from_json(card.to_json()) == card
    loaded = model_from_bytes(data, card)
    x = images(3, 32)
    spec = Preprocessing(input_size=32)
    np.testing.assert_allclose(predict_probabilities(loaded, x, spec), predict_probabilities(model, x, spec), atol=1e-6)


def test_bundle_refuses_damage_and_foreign_preprocessing():
    keras.utils.set_random_seed(0)
    data = model_to_bytes(build_classifier(2, 32, None, head="mlp"))
    with pytest.raises(BundleError, match="damaged or was replaced"):
        model_from_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:], _card(data))
    with pytest.raises(BundleError, match="not supported by this code"):
        model_from_bytes(data, _card(data, preprocessing={**Preprocessing(32).to_dict(), "version": 2}))
    with pytest.raises(BundleError, match="classes"):
        model_from_bytes(data, _card(data, classes=["a", "b", "c"]))
    with pytest.raises(BundleError, match="takes"):
        model_from_bytes(data, _card(data, preprocessing=Preprocessing(64).to_dict()))


def test_bundle_loading_uses_safe_mode():
    """A model with a Python lambda inside is refused rather than executed."""
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda t: t * 2)(inputs)))
    data = model_to_bytes(keras.Model(inputs, outputs))
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        model_from_bytes(data, _card(data))


assert os.environ.get("PREFECT_HOME")  # conftest isolates Prefect before any test module loads


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fine_tuning_trains_block5_only(policy):
    from model.training import fine_tune

    spec = Preprocessing(input_size=32)
    keras.utils.set_random_seed(0)
    model = build_classifier(2, 32, None, head="mlp")
    base, head = model.get_layer("vgg16"), model.get_layer("head")
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.layers if layer.get_weights()}
    head_before = [w.copy() for w in head.get_weights()]
    x, y = images(16, 32), np.array([0, 1] * 8)
    config = TrainingConfig(fine_tune_epochs=2, batch_size=8, fine_tune_learning_rate=1e-3, augment=False)
    history = fine_tune(model, TrainingData(x[:12], y[:12], x[12:], y[12:], 2), spec, config, policy=policy)
    assert len(history["loss"]) == 2 and "val_loss" in history
    # Under mixed precision the training ran on a bf16 copy of the base: what it learned is in the
    # model that is saved, which stays float32 throughout.
    for name, weights in before.items():
        changed = any(not np.array_equal(old, new) for old, new in zip(weights, base.get_layer(name).get_weights()))
        assert changed == name.startswith("block5"), name
    assert any(not np.array_equal(old, new) for old, new in zip(head_before, head.get_weights()))
    assert {variable.dtype for variable in model.weights} == {"float32"}
    assert {layer.compute_dtype for layer in base.layers[1:]} == {"float32"}
