"""Does the model see disease, or where the image came from? Stratified evaluation from metadata.

A stratum variable is a manifest column such as ``age_group``, ``source_dataset`` or ``view``; its
values are levels. When a level predicts the label (paediatric images are mostly pneumonia, adult
ones mostly COVID), a model can score well by recognising the level. Three checks expose that:
the AUC within levels (pairs of images from the same level only), the AUC of a metadata-only
baseline that knows nothing but the level, and per-level metrics. Intervals come from a patient
(cluster) bootstrap, since images of one patient are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from model.evaluation import auc, flags

__all__ = [
    "audit",
    "bootstrap_interval",
    "class_balanced_weights",
    "default_strata",
    "mean_within_stratum_auc",
    "metadata_baseline_auc",
    "shortcut_warnings",
    "stratum_sample_weights",
    "stratum_table",
    "within_stratum_auc",
]

Statistic = Callable[[np.ndarray, np.ndarray, np.ndarray], "float | None"]
MISSING_LEVEL = "(missing)"

# Columns that identify, locate, hash or measure an image, or restate its label: never strata.
_NOT_STRATA = {
    "file", "class", "label", "original_label", "patient", "patient_id", "sha256", "md5", "hash",
    "path", "source_path", "uri", "url", "width", "height", "size", "bytes", "commit", "source_repo",
}
_NOT_STRATA_SUFFIXES = ("_id", "_path", "_uri", "_url", "_hash", "_sha256", "_label", "_commit", "_size")


def _levels(levels: Sequence | np.ndarray) -> np.ndarray:
    """Levels as strings; an empty or absent value is a level of its own rather than an error."""
    return np.array([MISSING_LEVEL if value is None or str(value) == "" else str(value) for value in levels])


def within_stratum_auc(is_positive: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                       levels: Sequence | np.ndarray) -> float | None:
    """AUC over positive-negative pairs from the same level only; pairs across levels are left out.

    Equal to the mean of per-level AUCs weighted by each level's positives x negatives. A model
    that only recognises the level scores 0.5 here however high its overall AUC. None when no
    level has both classes.
    """
    is_positive, scores, levels = np.asarray(is_positive, bool), np.asarray(scores, float), np.asarray(levels)
    if levels.dtype == object:  # None among the levels: np.unique cannot sort None with strings
        levels = _levels(levels)
    total, pairs = 0.0, 0
    for level in np.unique(levels):
        inside = levels == level
        level_auc = auc(is_positive[inside], scores[inside])
        if level_auc is None:
            continue
        positives = int(is_positive[inside].sum())
        level_pairs = positives * (int(inside.sum()) - positives)
        total += level_auc * level_pairs
        pairs += level_pairs
    return total / pairs if pairs else None


def mean_within_stratum_auc(is_positive: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                            strata: dict[str, Sequence]) -> float | None:
    """The mean over stratum variables of ``within_stratum_auc`` (None where no variable has one):
    the one figure training selects, compares and promotes on, since a shortcut cannot inflate it."""
    values = [within_stratum_auc(is_positive, scores, levels) for levels in strata.values()]
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def metadata_baseline_auc(train_levels: Sequence, train_is_positive: Sequence | np.ndarray,
                          test_levels: Sequence, test_is_positive: Sequence | np.ndarray) -> float | None:
    """AUC of a model that knows only the level: each test image scores its level's positive rate
    in the training split (a level unseen in training scores the overall training rate).

    A high value means the label can be read off the metadata, so a model might learn the metadata.
    None when the test images hold one class only.
    """
    train_levels, test_levels = _levels(train_levels), _levels(test_levels)
    train_is_positive = np.asarray(train_is_positive, bool)
    overall = float(train_is_positive.mean()) if len(train_is_positive) else 0.0
    rates = {level: float(train_is_positive[train_levels == level].mean()) for level in np.unique(train_levels)}
    scores = np.array([rates.get(level, overall) for level in test_levels], float)
    return auc(np.asarray(test_is_positive, bool), scores)


def _patient_codes(patients: Sequence | None, count: int) -> np.ndarray:
    """Integer patient ids; an image without one is its own patient."""
    if patients is None:
        return np.arange(count)
    keys = [f"\0image-{index}" if patient is None or str(patient) == "" else str(patient)
            for index, patient in enumerate(patients)]
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def bootstrap_interval(
    statistic: Statistic,
    is_positive: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    levels: Sequence | np.ndarray,
    patients: Sequence | None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float | None, float | None]:
    """Percentile interval of ``statistic(is_positive, scores, levels)`` over patient resamples.

    Each resample draws patients with replacement and takes all their images, as many times as the
    patient was drawn: resampling images would treat a patient's near-identical images as
    independent evidence and give intervals that are too narrow. Resamples where the statistic is
    undefined (returns None) are skipped; (None, None) when every one is.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    is_positive, scores, levels = np.asarray(is_positive, bool), np.asarray(scores, float), np.asarray(levels)
    codes = _patient_codes(patients, len(is_positive))
    patient_count = int(codes.max()) + 1 if len(codes) else 0
    if patient_count == 0:
        return None, None
    rng = np.random.default_rng(seed)
    image_numbers = np.arange(len(codes))
    values = []
    for _ in range(n_resamples):
        times_drawn = np.bincount(rng.integers(0, patient_count, patient_count), minlength=patient_count)
        index = np.repeat(image_numbers, times_drawn[codes])
        value = statistic(is_positive[index], scores[index], levels[index])
        if value is not None and np.isfinite(value):
            values.append(value)
    if not values:
        return None, None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _plain_auc(is_positive: np.ndarray, scores: np.ndarray, levels: np.ndarray) -> float | None:
    return auc(is_positive, scores)


def _sensitivity_at(threshold: float) -> Statistic:
    def sensitivity(is_positive: np.ndarray, scores: np.ndarray, levels: np.ndarray) -> float | None:
        return float(flags(scores[is_positive], threshold).mean()) if is_positive.any() else None
    return sensitivity


def _specificity_at(threshold: float) -> Statistic:
    def specificity(is_positive: np.ndarray, scores: np.ndarray, levels: np.ndarray) -> float | None:
        return float((~flags(scores[~is_positive], threshold)).mean()) if (~is_positive).any() else None
    return specificity


def stratum_table(is_positive: Sequence | np.ndarray, scores: Sequence | np.ndarray, threshold: float,
                  levels: Sequence | np.ndarray) -> list[dict]:
    """One row per level, sorted by level: counts, AUC, sensitivity and specificity at ``threshold``
    (None where a level lacks the class they need), share flagged, mean positive probability."""
    is_positive, scores, levels = np.asarray(is_positive, bool), np.asarray(scores, float), _levels(levels)
    rows = []
    for level in sorted(set(levels.tolist())):
        inside = levels == level
        positive, score = is_positive[inside], scores[inside]
        flagged = flags(score, threshold)
        rows.append({
            "level": level,
            "images": int(inside.sum()),
            "positives": int(positive.sum()),
            "auc": auc(positive, score),
            "sensitivity": float(flagged[positive].mean()) if positive.any() else None,
            "specificity": float((~flagged[~positive]).mean()) if (~positive).any() else None,
            "flagged_share": float(flagged.mean()),
            "mean_probability": float(score.mean()),
        })
    return rows


def _interval(bounds: tuple[float | None, float | None]) -> list[float | None]:
    return [bounds[0], bounds[1]]


def audit(
    is_positive: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    threshold: float,
    strata: dict[str, list[str]],
    patients: Sequence | None,
    train_strata: dict[str, list[str]],
    train_is_positive: Sequence | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """The whole validity check for the test split, as plain JSON types.

    ``strata`` maps each variable to the test images' levels; ``train_strata`` the same for the
    training images, whose labels ``train_is_positive`` feed the metadata-only baseline (a variable
    missing from ``train_strata`` gets no baseline).
    """
    is_positive, scores = np.asarray(is_positive, bool), np.asarray(scores, float)
    no_levels = np.zeros(len(scores), int)

    def interval(statistic: Statistic, levels: np.ndarray) -> list[float | None]:
        return _interval(bootstrap_interval(statistic, is_positive, scores, levels, patients, n_resamples, seed))

    sensitivity, specificity = _sensitivity_at(threshold), _specificity_at(threshold)
    overall = {
        "images": int(len(scores)),
        "positives": int(is_positive.sum()),
        "auc": auc(is_positive, scores),
        "auc_ci": interval(_plain_auc, no_levels),
        "sensitivity": sensitivity(is_positive, scores, no_levels),
        "sensitivity_ci": interval(sensitivity, no_levels),
        "specificity": specificity(is_positive, scores, no_levels),
        "specificity_ci": interval(specificity, no_levels),
    }
    by_variable = {}
    for variable, values in strata.items():
        levels = _levels(values)
        baseline = None
        if variable in train_strata:
            baseline = metadata_baseline_auc(train_strata[variable], train_is_positive, levels, is_positive)
        by_variable[variable] = {
            "levels": stratum_table(is_positive, scores, threshold, levels),
            "within_auc": within_stratum_auc(is_positive, scores, levels),
            "within_auc_ci": interval(within_stratum_auc, levels),
            "metadata_baseline_auc": baseline,
        }
    result = {"overall": overall, "strata": by_variable}
    result["warnings"] = shortcut_warnings(result)
    return result


def shortcut_warnings(audit_dict: dict, baseline_limit: float = 0.80, gap_limit: float = 0.10) -> list[str]:
    """One sentence per sign of a shortcut in an ``audit`` result; an empty list when there is none."""
    warnings = []
    overall_auc = audit_dict.get("overall", {}).get("auc")
    for variable, found in audit_dict.get("strata", {}).items():
        baseline, within = found.get("metadata_baseline_auc"), found.get("within_auc")
        if baseline is not None and baseline >= baseline_limit:
            warnings.append(
                f"the label is predictable from {variable} alone: metadata-only AUC {baseline:.2f} "
                f"(limit {baseline_limit:.2f}); the model may be recognising {variable} rather than disease"
            )
        if within is not None and overall_auc is not None and within < overall_auc - gap_limit:
            warnings.append(
                f"within levels of {variable} the AUC is {within:.2f}, {overall_auc - within:.2f} below the "
                f"overall {overall_auc:.2f}: part of the apparent skill comes from telling {variable} levels apart"
            )
    return warnings


def default_strata(columns: dict[str, list[str]]) -> list[str]:
    """The manifest columns worth stratifying by: 2 to 20 distinct non-empty values, and not an
    identifier, hash, path, size or restated label (those are unique per image or say nothing
    about where an image came from). In the order given."""
    chosen = []
    for name, values in columns.items():
        key = name.strip().lower()
        if key in _NOT_STRATA or key.endswith(_NOT_STRATA_SUFFIXES):
            continue
        distinct = {str(value).strip() for value in values if value is not None and str(value).strip()}
        if 2 <= len(distinct) <= 20:
            chosen.append(name)
    return chosen


def class_balanced_weights(labels: Sequence | np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights per image (every class present has the same total
    weight), scaled to mean 1."""
    labels = np.asarray(labels, int)
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = int((counts > 0).sum())
    weights = len(labels) / (present * counts[labels])
    return weights / weights.mean()


def stratum_sample_weights(labels: np.ndarray, levels: Sequence | np.ndarray, num_classes: int,
                           mixed_only: bool = False) -> np.ndarray:
    """Training weights under which the label says nothing about the level, where it can.

    Inside each level holding several classes, every class present gets the same share of the
    level's images, so that level teaches only what tells the classes apart. A level holding one
    class only cannot be balanced; its images keep their class-balanced weight (as with class
    weights alone): they are real patients the model will meet, and down-weighting them (to a
    tenth, as before) left the model not knowing what they look like, so it flagged children with
    bacterial pneumonia as COVID-19. With ``mixed_only`` they are dropped (weight 0) instead.
    Weights have mean 1.
    """
    labels, levels = np.asarray(labels, int), _levels(levels)
    if len(labels) != len(levels):
        raise ValueError(f"labels and levels differ in length: {len(labels)} and {len(levels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    weights = class_balanced_weights(labels, num_classes) if len(labels) else np.zeros(0)
    for level in np.unique(levels):
        inside = levels == level
        counts = np.bincount(labels[inside], minlength=num_classes)
        present = int((counts > 0).sum())
        if present > 1:
            weights[inside] = inside.sum() / (present * counts[labels[inside]])
        elif mixed_only:
            weights[inside] = 0.0
    if not weights.any():
        raise ValueError("no level holds more than one class: nothing is left to weight")
    return weights / weights.mean()
