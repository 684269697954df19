"""Site validation: how a stored model does on a site's own labelled X-rays, set against its card.

The figures are the training audit's (model.validity.audit: overall and per-stratum metrics with
patient-level bootstrap intervals, within-stratum AUC, shortcut warnings), the operating point at
the card's threshold, calibration (ECE, Brier, reliability curve), and each figure beside the
card's own test-split value and its 95 % interval. The metadata-only baseline cannot use training
levels here (a site has none), so it is cross-fitted within the site's images: each image scores
its level's positive rate among other patients' images (patient-grouped folds).

Pure: arrays in, plain JSON types out. ``evaluation_problem`` checks a record read back from a
store, whose verdict is recomputed from its figures (``verdict_of``), never taken as stored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime

import numpy as np

from model.acceptance import Acceptance, Verdict, judge
from model.bundle import is_safe_name
from model.calibration import brier_score, expected_calibration_error, reliability_curve
from model.evaluation import auc, evaluate, flags
from model.validity import MISSING_LEVEL, audit, shortcut_warnings

__all__ = ["BASELINE_METHOD", "compare_with_card", "cross_fitted_baseline_auc", "evaluation_problem", "site_figures",
           "verdict_of"]

BASELINE_METHOD = "cross-fitted within the site's images: 5 patient-grouped folds, each scored by its level's " \
                  "positive rate in the other folds"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FOLDS = 5


def cross_fitted_baseline_auc(levels: Sequence[str], is_positive: Sequence | np.ndarray, patients: Sequence | None,
                              folds: int = _FOLDS, seed: int = 0) -> float | None:
    """AUC of a model that knows only the level, learned on the site's own images without scoring
    what it learned from: patients are dealt into ``folds`` folds; each image scores its level's
    positive rate among the other folds' images (their overall rate for a level they lack).

    High means the site's label can be read off this column, so a high AUC on the site could come
    from telling its levels apart. None with one class only or fewer than two patients.
    """
    levels = np.array([MISSING_LEVEL if level is None or str(level) == "" else str(level) for level in levels])
    is_positive = np.asarray(is_positive, bool)
    keys = [f"\0image-{index}" if patient is None or str(patient) == "" else str(patient)
            for index, patient in enumerate(patients if patients is not None else [None] * len(levels))]
    codes = np.unique(keys, return_inverse=True)[1].reshape(-1)
    patient_count = int(codes.max()) + 1 if len(codes) else 0
    folds = min(folds, patient_count)
    if folds < 2:
        return None
    fold_of_patient = np.random.default_rng(seed).permutation(patient_count) % folds
    fold = fold_of_patient[codes]
    scores = np.zeros(len(levels))
    for number in range(folds):
        inside, learned = fold == number, fold != number
        overall = float(is_positive[learned].mean())
        for level in np.unique(levels[inside]):
            source = learned & (levels == level)
            scores[inside & (levels == level)] = float(is_positive[source].mean()) if source.any() else overall
    return auc(is_positive, scores)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def site_figures(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], positive: str,
                 threshold: float, strata: dict[str, list[str]], patients: Sequence | None,
                 n_resamples: int = 1000, seed: int = 0, bins: int = 10) -> dict:
    """Everything measured on the site's images, as plain JSON types: ``metrics`` (classification
    report, confusion matrix, per class), ``overall`` and ``strata`` (the audit, with cross-fitted
    metadata baselines), ``operating_point`` at ``threshold``, ``calibration`` and ``warnings``."""
    labels = np.asarray(labels, int)
    probabilities = np.asarray(probabilities, float)
    is_positive = labels == list(classes).index(positive)
    scores = probabilities[:, list(classes).index(positive)]
    found = audit(is_positive, scores, threshold, strata, patients, {}, [], n_resamples=n_resamples, seed=seed)
    for variable, levels in strata.items():
        found["strata"][variable]["metadata_baseline_auc"] = cross_fitted_baseline_auc(levels, is_positive, patients,
                                                                                       seed=seed)
        found["strata"][variable]["metadata_baseline_method"] = BASELINE_METHOD
    flagged = flags(scores, threshold)
    predicted, observed, counts = reliability_curve(is_positive, scores, bins)
    return {
        "metrics": evaluate(labels, probabilities, classes, positive, threshold),
        "overall": found["overall"],
        "strata": found["strata"],
        "warnings": shortcut_warnings(found),
        "operating_point": {
            "threshold": float(threshold), "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
            "true_positives": int((flagged & is_positive).sum()),
            "false_positives": int((flagged & ~is_positive).sum()),
            "true_negatives": int((~flagged & ~is_positive).sum()),
            "false_negatives": int((~flagged & is_positive).sum()),
            "sensitivity": found["overall"]["sensitivity"], "specificity": found["overall"]["specificity"]},
        "calibration": {
            "bins": bins, "ece": expected_calibration_error(is_positive, scores, bins),
            "brier": brier_score(is_positive, scores),
            "reliability": {"mean_probability": [_finite(v) for v in predicted],
                            "observed_rate": [_finite(v) for v in observed], "images": [int(c) for c in counts]}},
    }


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(value) else None
    except OverflowError:  # an integer too large for a float
        return None


def _interval(value: object) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = _number(value[0]), _number(value[1])
    return None if low is None or high is None else [low, high]


def _compared(figure: str, site: object, card: object, interval: object) -> dict:
    site, card, bounds = _number(site), _number(card), _interval(interval)
    if site is None or bounds is None:
        where = "n/a"
    else:
        where = "below" if site < bounds[0] else "above" if site > bounds[1] else "inside"
    return {"figure": figure, "site": site, "card": card, "card_ci": bounds,
            "inside": None if where == "n/a" else where == "inside", "where": where}


def compare_with_card(figures: dict, card_validity: dict, card_metrics: dict, card_calibration: dict) -> list[dict]:
    """Each site figure beside the card's test-split value and 95 % interval: ``inside`` (bool, or
    None where either side lacks the figure or the card has no interval) and ``where`` ('inside',
    'below', 'above' or 'n/a'). Overall AUC, sensitivity and specificity at the threshold; the
    within-stratum AUC of every variable both measured; the ECE (the card records no interval)."""
    card_validity = card_validity if isinstance(card_validity, dict) else {}
    theirs = card_validity.get("overall") if isinstance(card_validity.get("overall"), dict) else {}
    positive = card_metrics.get("positive") if isinstance(card_metrics, dict) else None
    positive = positive if isinstance(positive, dict) else {}
    rows = []
    for name, figure, fallback in (("auc", "AUC", "auc"),
                                   ("sensitivity", "sensitivity at the threshold", "sensitivity_at_threshold"),
                                   ("specificity", "specificity at the threshold", "specificity_at_threshold")):
        rows.append(_compared(figure, figures["overall"].get(name), theirs.get(name, positive.get(fallback)),
                              theirs.get(f"{name}_ci")))
    card_strata = card_validity.get("strata") if isinstance(card_validity.get("strata"), dict) else {}
    for variable, found in figures["strata"].items():
        other = card_strata.get(variable)
        if isinstance(other, dict):
            rows.append(_compared(f"AUC within {variable}", found.get("within_auc"), other.get("within_auc"),
                                  other.get("within_auc_ci")))
    test = card_calibration.get("test") if isinstance(card_calibration, dict) else None
    card_ece = test.get("ece_after") if isinstance(test, dict) else None
    rows.append(_compared("ECE", figures["calibration"]["ece"], card_ece, None))
    return rows


# What serving relies on in a stored evaluation; everything else is shown, never acted on.
_REQUIRED = {"evaluation_id": str, "model_version": str, "model_card_sha256": str, "created_at": str, "dataset": dict,
             "images": int, "threshold": float, "overall": dict, "verdict": dict}


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def evaluation_problem(values: object) -> str | None:
    """What is wrong with a stored evaluation's fields (the first thing found), or None."""
    if not isinstance(values, dict):
        return f"not an evaluation: a JSON object was expected, found {type(values).__name__}"
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        return f"not an evaluation: {', '.join(missing)} missing"
    for name, kind in _REQUIRED.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            return f"{name} is {type(value).__name__}, not {kind.__name__}"
    if not is_safe_name(values["evaluation_id"]) or not is_safe_name(values["model_version"]):
        return "evaluation_id and model_version must be safe names"
    if not _SHA256.match(values["model_card_sha256"]):
        return f"model_card_sha256 {_short(values['model_card_sha256'])} is not a sha256"
    try:
        datetime.fromisoformat(values["created_at"])
    except ValueError:
        return f"created_at {_short(values['created_at'])} is not an ISO 8601 time"
    if values["images"] < 0 or not (_number(values["threshold"]) is not None and 0 < values["threshold"] < 1):
        return "images or threshold out of range"
    dataset = values["dataset"]
    if not isinstance(dataset.get("uri"), str) or not isinstance(dataset.get("fingerprint"), str):
        return "dataset.uri and dataset.fingerprint must be strings"
    for name in ("auc", "sensitivity", "specificity"):
        value = values["overall"].get(name)
        if value is not None and not (_number(value) is not None and 0 <= value <= 1):
            return f"overall.{name} {_short(value)} is not a share in [0, 1]"
        interval = values["overall"].get(f"{name}_ci")
        if interval is not None and interval != [None, None] and _interval(interval) is None:
            return f"overall.{name}_ci {_short(interval)} is not an interval"
    if not isinstance(values["verdict"].get("criteria"), dict) or not isinstance(values["verdict"].get("fit"), bool):
        return "verdict must hold criteria (an object) and fit (true or false)"
    return None


def verdict_of(values: dict) -> Verdict:
    """The verdict of a checked evaluation (``evaluation_problem`` found nothing), recomputed from
    its figures under its criteria; a stored verdict that says otherwise is refused (ValueError)."""
    criteria = Acceptance.from_dict(values["verdict"]["criteria"])
    verdict = judge(values["overall"], criteria)
    if verdict.fit != values["verdict"]["fit"]:
        raise ValueError(f"its verdict says {'fit' if values['verdict']['fit'] else 'not fit'}, its figures say "
                         f"{'fit' if verdict.fit else 'not fit'}")
    return verdict
