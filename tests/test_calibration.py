"""model/calibration.py: temperature scaling on a deliberately over-confident toy model, ECE and
Brier score by hand, the reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import (
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from model.plots import reliability_png


def _negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probabilities[np.arange(len(labels)), labels]).mean())


def _over_confident(count: int, seed: int, sharpening: float = 3.0):
    """Outcomes drawn from true probabilities p; the model reports p with its logit multiplied by
    ``sharpening``, i.e. the truth seen through a temperature of 1 / sharpening."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.05, 0.95, count)
    labels = (rng.random(count) < true).astype(int)
    reported = 1 / (1 + np.exp(-sharpening * np.log(true / (1 - true))))
    return np.stack([1 - reported, reported], axis=1), labels


def test_temperature_scaling_undoes_over_confidence():
    validation, validation_labels = _over_confident(4000, seed=0)
    temperature = fit_temperature(validation, validation_labels)
    assert temperature == pytest.approx(3.0, abs=0.3)
    test, test_labels = _over_confident(4000, seed=1)
    calibrated = apply_temperature(test, temperature)
    before = expected_calibration_error(test_labels, test[:, 1])
    after = expected_calibration_error(test_labels, calibrated[:, 1])
    assert before > 0.08 and after < before / 2
    assert _negative_log_likelihood(calibrated, test_labels) < _negative_log_likelihood(test, test_labels) - 0.05
    assert brier_score(test_labels, calibrated[:, 1]) < brier_score(test_labels, test[:, 1])
    # Ranking is untouched: the worklist order and AUC stay as they were.
    assert (np.argsort(calibrated[:, 1], kind="stable") == np.argsort(test[:, 1], kind="stable")).all()


def test_a_calibrated_model_keeps_a_temperature_near_one():
    honest, labels = _over_confident(4000, seed=2, sharpening=1.0)
    assert fit_temperature(honest, labels) == pytest.approx(1.0, abs=0.15)


def test_temperature_one_changes_nothing_and_rows_sum_to_one():
    probabilities = np.random.default_rng(0).dirichlet([1.0, 2.0, 0.5], 50)
    assert np.allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-6)
    softened = apply_temperature(probabilities, 2.5)
    assert np.allclose(softened.sum(axis=1), 1.0)
    assert (softened.max(axis=1) <= probabilities.max(axis=1) + 1e-12).all()  # T > 1 softens
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(probabilities, 0.0)


def test_expected_calibration_error_by_hand():
    # Bin [0.0, 0.1): mean 0.05, observed 1/2, gap 0.45; bin [0.9, 1.0]: mean 0.95 (1.0 falls in
    # the last bin), observed 1, gap 0.05. Each bin holds half the images: 0.225 + 0.025.
    assert expected_calibration_error([0, 1, 1, 1], [0.05, 0.05, 0.9, 1.0]) == pytest.approx(0.25)
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    predicted, observed, counts = reliability_curve([0, 1, 1, 1], [0.05, 0.05, 0.9, 1.0])
    assert counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2] and observed[0] == 0.5 and np.isnan(predicted[1])


def test_brier_score_by_hand():
    assert brier_score([1, 0], [0.8, 0.3]) == pytest.approx((0.2**2 + 0.3**2) / 2)
    assert brier_score([1, 1, 0], [1.0, 1.0, 0.0]) == 0.0


def test_reliability_png_is_a_png():
    probabilities, labels = _over_confident(300, seed=3)
    png = reliability_png(labels, probabilities[:, 1], apply_temperature(probabilities, 3.0)[:, 1])
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_temperature_and_bias_undo_a_shifted_prior_that_temperature_alone_cannot():
    from model.calibration import apply_temperature_and_bias, fit_temperature_and_bias

    rng = np.random.default_rng(11)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    # What a model trained with class-balancing weights reports: sharpened and pushed towards class 1.
    reported = 1 / (1 + np.exp(-(2.0 * true_logit + 1.5)))
    probabilities = np.column_stack([1 - reported, reported])
    temperature, bias = fit_temperature_and_bias(probabilities, labels)
    assert temperature == pytest.approx(2.0, rel=0.15) and bias[0] == 0.0
    assert bias[1] == pytest.approx(-0.75, abs=0.2)  # log-odds shift of 1.5, divided by T
    both = apply_temperature_and_bias(probabilities, temperature, bias)[:, 1]
    alone = apply_temperature(probabilities, fit_temperature(probabilities, labels))[:, 1]
    assert expected_calibration_error(labels, both) < 0.02 < expected_calibration_error(labels, alone)
