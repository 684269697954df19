"""The scope score on distributions whose answers are known."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest

from model.scope import ScopeModel, fit_scope, scope_features


def relu_features(rng: np.random.Generator, n: int, shift: float = 0.0, features: int = 32) -> np.ndarray:
    """Non-negative, skewed, correlated: like pooled ReLU features."""
    mixing = np.random.default_rng(0).normal(size=(features, features)) / np.sqrt(features)
    return np.maximum(rng.normal(size=(n, features)) @ mixing + 1.0 + shift, 0.0) ** 2


@pytest.fixture(scope="module")
def fitted() -> ScopeModel:
    rng = np.random.default_rng(1)
    features = relu_features(rng, 600)
    return fit_scope(features, groups=np.arange(600) // 2)  # two images a patient


def test_new_images_like_the_training_ones_pass_at_the_stated_rate(fitted):
    passed = fitted.in_scope(relu_features(np.random.default_rng(2), 4000)).mean()
    # At least 0.99 by the conformal argument, up to the binomial noise of 4000 draws (sd 0.0016)
    # and of the 600 calibration scores; not everything (the threshold is not infinite).
    assert 0.982 <= passed < 1.0, passed
    assert fitted.pass_rate == 0.99 and fitted.calibration_images == 600


def test_the_threshold_follows_the_pass_rate():
    rng = np.random.default_rng(3)
    loose = fit_scope(relu_features(rng, 600), pass_rate=0.8)
    passed = loose.in_scope(relu_features(np.random.default_rng(4), 4000)).mean()
    assert 0.76 <= passed <= 0.86, passed


def test_shifted_images_are_out_of_scope(fitted):
    rng = np.random.default_rng(5)
    assert fitted.in_scope(relu_features(rng, 1000, shift=1.5)).mean() < 0.05
    assert not fitted.in_scope(np.full((1, 32), 1e4)).any()
    assert not fitted.in_scope(np.zeros((1, 32))).any()  # a blank image's features: nothing like training
    scores = fitted.score(relu_features(rng, 500, shift=0.5))
    assert np.median(scores) > np.median(fitted.score(relu_features(rng, 500)))  # the score grows with the shift


def test_the_score_survives_its_bytes(fitted):
    again = ScopeModel.from_bytes(fitted.to_bytes())
    features = relu_features(np.random.default_rng(6), 50)
    assert np.allclose(again.score(features), fitted.score(features), rtol=1e-4)
    assert again.threshold == fitted.threshold and again.pass_rate == fitted.pass_rate


@pytest.mark.parametrize("damage", ["garbage", "short precision", "nan", "pass rate", "pickle"])
def test_damaged_scope_bytes_are_refused_naming_the_file(fitted, damage):
    if damage == "garbage":
        data = b"PK\x03\x04 not really"
    else:
        values = {"mean": fitted.mean, "precision": fitted.precision, "threshold": fitted.threshold,
                  "pass_rate": fitted.pass_rate, "calibration_images": fitted.calibration_images}
        if damage == "short precision":
            values["precision"] = fitted.precision[:-1]
        elif damage == "nan":
            values["mean"] = np.where(np.arange(len(fitted.mean)) == 3, np.nan, fitted.mean)
        elif damage == "pass rate":
            values["pass_rate"] = 1.5
        else:
            values["mean"] = np.array([object()], dtype=object)
        buffer = io.BytesIO()
        np.savez(buffer, **values)
        data = buffer.getvalue()
    with pytest.raises(ValueError, match="v1/scope.npz"):
        ScopeModel.from_bytes(data, "v1/scope.npz")


def test_too_few_images_or_patients_are_refused():
    with pytest.raises(ValueError, match="at least 10"):
        fit_scope(np.ones((6, 4)))
    with pytest.raises(ValueError, match="two patients"):
        fit_scope(relu_features(np.random.default_rng(7), 40), groups=np.zeros(40))


def test_scope_features_are_what_the_head_reads():
    maps = np.random.default_rng(8).random((3, 14, 14, 8)).astype(np.float32)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.MaxPooling2D(2)(maps))
    assert np.allclose(scope_features(maps), np.asarray(pooled), atol=1e-6)
