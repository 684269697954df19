"""Are the probabilities honest? Temperature scaling, expected calibration error, Brier score.

Networks trained with cross-entropy tend to be over-confident (Guo et al. 2017, "On Calibration
of Modern Neural Networks"). Temperature scaling divides the logits by one number T fitted on the
validation split: it changes no ranking, so AUC and the order of the worklist stay as they are,
but a probability of 0.9 comes to mean about nine in ten. Our model outputs softmax
probabilities, not logits; log-probabilities are logits up to a per-image constant, which softmax
ignores, so they serve as logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import brier_score_loss

__all__ = ["apply_temperature", "apply_temperature_and_bias", "brier_score", "expected_calibration_error",
           "fit_temperature", "fit_temperature_and_bias", "reliability_curve"]

# Bounds for T: far beyond what a trained network needs, narrow enough to keep exp() finite.
_LOWEST_TEMPERATURE, _HIGHEST_TEMPERATURE = 0.05, 20.0
_SMALLEST_PROBABILITY = 1e-12  # log(0) would be -inf: a probability of exactly 0 counts as this


def _logits(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, float)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"expected probabilities of shape (images, classes >= 2), got {probabilities.shape}")
    return np.log(np.clip(probabilities, _SMALLEST_PROBABILITY, 1.0))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of ``softmax(log p / T)`` on
    these (validation) images. T > 1 softens over-confident probabilities, T < 1 sharpens."""
    logits = _logits(probabilities)
    labels = np.asarray(labels, int)
    if len(labels) != len(logits) or len(labels) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(labels)} labels "
                         f"for {len(logits)} images")
    rows = np.arange(len(labels))

    def negative_log_likelihood(log_temperature: float) -> float:
        return float(-_log_softmax(logits / np.exp(log_temperature))[rows, labels].mean())

    # Searching log T makes the problem symmetric around T = 1 and keeps T positive.
    found = minimize_scalar(negative_log_likelihood, method="bounded",
                            bounds=(np.log(_LOWEST_TEMPERATURE), np.log(_HIGHEST_TEMPERATURE)))
    return float(np.exp(found.x))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities recalibrated with ``temperature``: ``softmax(log p / T)``; rows sum to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.exp(_log_softmax(_logits(probabilities) / temperature))


def fit_temperature_and_bias(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Temperature and a bias per class (the first held at 0): ``softmax(log p / T + b)``, fitted by
    negative log-likelihood on these (validation) images.

    Temperature alone cannot move the class prior, and training with weights that balance classes
    (inside strata, or overall) shifts it: on the shared data temperature alone left a test ECE of
    0.11, the bias brought it to 0.06 (bench/validity_bench.py). Like the temperature, the bias
    changes no ranking within a class's probability; it moves where the threshold falls.
    """
    logits = _logits(probabilities)
    labels = np.asarray(labels, int)
    if len(labels) != len(logits) or len(labels) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(labels)} labels "
                         f"for {len(logits)} images")
    rows, classes = np.arange(len(labels)), logits.shape[1]
    start = np.log(fit_temperature(probabilities, labels))

    def negative_log_likelihood(values: np.ndarray) -> float:
        log_temperature = np.clip(values[0], np.log(_LOWEST_TEMPERATURE), np.log(_HIGHEST_TEMPERATURE))
        bias = np.concatenate([[0.0], values[1:]])
        return float(-_log_softmax(logits / np.exp(log_temperature) + bias)[rows, labels].mean())

    found = minimize(negative_log_likelihood, np.concatenate([[start], np.zeros(classes - 1)]), method="L-BFGS-B",
                     bounds=[(np.log(_LOWEST_TEMPERATURE), np.log(_HIGHEST_TEMPERATURE))] + [(-10.0, 10.0)] * (classes - 1))
    return float(np.exp(found.x[0])), np.concatenate([[0.0], found.x[1:]])


def apply_temperature_and_bias(probabilities: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    """``softmax(log p / T + b)``; rows sum to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.exp(_log_softmax(_logits(probabilities) / temperature + np.asarray(bias, float)))


def reliability_curve(is_positive: Sequence | np.ndarray, positive_probability: Sequence | np.ndarray,
                      bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of [0, 1]: mean predicted probability, observed positive rate, image
    count (empty bins have count 0 and NaN means). The last bin includes 1.0."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    is_positive = np.asarray(is_positive, float)
    probability = np.asarray(positive_probability, float)
    which = np.clip((probability * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(which, weights=probability, minlength=bins) / counts
        observed = np.bincount(which, weights=is_positive, minlength=bins) / counts
    return predicted, observed, counts


def expected_calibration_error(is_positive: Sequence | np.ndarray, positive_probability: Sequence | np.ndarray,
                               bins: int = 10) -> float:
    """Expected calibration error of the positive-class probability, the number screening
    thresholds (not the top-label ECE of Guo et al., which asks about the predicted class).

    ``bins`` equal-width bins on [0, 1]; the gap |observed positive rate - mean probability| of
    each bin, weighted by its share of the images.
    """
    predicted, observed, counts = reliability_curve(is_positive, positive_probability, bins)
    if counts.sum() == 0:
        raise ValueError("no images to compute a calibration error on")
    filled = counts > 0
    return float((np.abs(observed[filled] - predicted[filled]) * counts[filled]).sum() / counts.sum())


def brier_score(is_positive: Sequence | np.ndarray, positive_probability: Sequence | np.ndarray) -> float:
    """Mean squared difference between the positive-class probability and the outcome (0 or 1)."""
    return float(brier_score_loss(np.asarray(is_positive, int), np.asarray(positive_probability, float), pos_label=1))
