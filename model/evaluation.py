"""Test-split metrics with scikit-learn, and the decision threshold for the positive class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import classification_report, confusion_matrix, roc_curve

__all__ = ["auc", "choose_threshold", "evaluate", "flags", "predict_classes", "sensitivity_specificity"]


def flags(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The operating point: which images are flagged, as booleans. An image is flagged when its
    positive-class probability is at or above the threshold (a NaN probability is never flagged)."""
    return np.asarray(probabilities, float) >= threshold


def auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for ``is_positive`` (truthy: positive); None when one class is absent,
    where it is undefined. Mann-Whitney from average ranks (ties count 1/2), equal to scikit-learn's
    ``roc_auc_score`` at a fraction of its per-call cost, which a bootstrap pays a thousand times.
    Like ``roc_auc_score``, refuses scores that are not finite and lengths that differ."""
    is_positive, scores = np.asarray(is_positive, bool).reshape(-1), np.asarray(scores, float).reshape(-1)
    if len(is_positive) != len(scores):
        raise ValueError(f"{len(is_positive)} labels but {len(scores)} scores")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (a NaN or infinite score has no rank)")
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[is_positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def choose_threshold(is_positive: np.ndarray, positive_probability: np.ndarray, target_sensitivity: float = 0.95,
                     weights: np.ndarray | None = None) -> float:
    """A threshold whose sensitivity on these (validation) images reaches the target, with the best
    specificity that allows. With ``weights`` the sensitivity is weighted (each positive counts by
    its weight), as when strata are balanced in training.

    An image is flagged at or above the threshold (``flags``). The threshold sits halfway between
    the lowest positive score that must be flagged and the next lower score of any image, rather
    than on that score itself: on small validation sets a threshold at an observed score misses
    every test positive just below it.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    is_positive = np.asarray(is_positive, bool)
    scores = np.asarray(positive_probability, float)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, float)
    order = np.argsort(-scores[is_positive], kind="stable")
    positives, positive_weights = scores[is_positive][order], weights[is_positive][order]
    if len(positives) == 0 or positive_weights.sum() <= 0:
        raise ValueError("no positive images to choose a threshold on")
    # The fewest top-scored positives whose weight reaches the target share of all positives' weight.
    reached = np.cumsum(positive_weights) >= target_sensitivity * positive_weights.sum() - 1e-9
    lowest_flagged = positives[int(np.argmax(reached))]
    below = scores[scores < lowest_flagged]
    return float((lowest_flagged + below.max()) / 2) if len(below) else float(lowest_flagged)


def predict_classes(probabilities: np.ndarray, classes: Sequence[str], positive: str, threshold: float) -> np.ndarray:
    """Class indices. With two classes the threshold decides, so the predicted class is the positive
    one exactly when the image is flagged; with more, the most probable class (and a flag, from the
    threshold on the positive class, may then sit beside another predicted class)."""
    probabilities = np.asarray(probabilities, float)
    if len(classes) == 2:
        index = list(classes).index(positive)
        return np.where(flags(probabilities[:, index], threshold), index, 1 - index)
    return probabilities.argmax(axis=1)


def sensitivity_specificity(is_positive: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    is_positive, flagged = np.asarray(is_positive, bool), np.asarray(flagged, bool)
    positives, negatives = is_positive.sum(), (~is_positive).sum()
    sensitivity = float((flagged & is_positive).sum() / positives) if positives else float("nan")
    specificity = float((~flagged & ~is_positive).sum() / negatives) if negatives else float("nan")
    return sensitivity, specificity


def evaluate(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    positive: str,
    threshold: float,
) -> dict:
    """Everything the card, the report and the promotion decision need, as plain JSON types."""
    labels = np.asarray(labels, int)
    probabilities = np.asarray(probabilities, float)
    predicted = predict_classes(probabilities, classes, positive, threshold)
    indices = list(range(len(classes)))
    matrix = confusion_matrix(labels, predicted, labels=indices)
    per_class = {}
    for index, name in enumerate(classes):
        true_positive = matrix[index, index]
        false_negative = matrix[index].sum() - true_positive
        false_positive = matrix[:, index].sum() - true_positive
        true_negative = matrix.sum() - true_positive - false_negative - false_positive
        per_class[name] = {
            "sensitivity": _ratio(true_positive, true_positive + false_negative),
            "specificity": _ratio(true_negative, true_negative + false_positive),
            "auc": auc(labels == index, probabilities[:, index]),
        }
    report = classification_report(
        labels, predicted, labels=indices, target_names=list(classes), output_dict=True, zero_division=0
    )
    positive_index = list(classes).index(positive)
    is_positive = labels == positive_index
    sensitivity, specificity = sensitivity_specificity(is_positive, flags(probabilities[:, positive_index], threshold))
    fpr, tpr, _ = roc_curve(is_positive, probabilities[:, positive_index]) if 0 < is_positive.sum() < len(labels) else ([], [], [])
    return {
        "images": int(len(labels)),
        "accuracy": float(report["accuracy"]),
        "classification_report": report,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "macro_auc": _mean([c["auc"] for c in per_class.values()]),
        "positive": {
            "class": positive,
            "auc": per_class[positive]["auc"],
            "threshold": float(threshold),
            "sensitivity_at_threshold": sensitivity,
            "specificity_at_threshold": specificity,
            "roc": {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]},
        },
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
