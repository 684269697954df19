"""The linear head, fitted as what it is: an L2-regularised logistic regression on pooled features.

The linear head (standardised pooled features -> one Dense softmax layer) is exactly scikit-learn's
``LogisticRegression`` on standardised features, so it is fitted by that solver to convergence
rather than by epochs of Adam: no epoch to choose, and nothing of the fit left to chance.

What is left to choose (the regularisation ``C``, the weighting, augmented or plain features) is
chosen by patient-grouped, class-stratified k-fold cross-validation over the training images on
their cached features: each candidate is scored on out-of-fold predictions of all of them, not on
one small validation split whose strata hold a dozen images. The selection rule (``SELECTION_RULE``)
keeps overall and within-stratum discrimination both.

The built-in baseline is the same search restricted to plain (unaugmented) features: a plain
logistic regression on the model's own features, which the trained model must not fall below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from model.evaluation import auc
from model.validity import class_balanced_weights, mean_within_stratum_auc, stratum_sample_weights

__all__ = ["C_GRID", "FOLDS", "SELECTION_RULE", "CrossValidation", "HeadSelection", "LogisticHead", "Selection",
           "cross_validated_folds", "fit_logistic", "fit_selected", "select_logistic_head"]

# Inverse regularisation strengths tried (scikit-learn's C; L2 penalty 1 / (2 C) per unit of
# weight): from very strong, where only the few most telling directions survive, to mild.
C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 5
SELECTION_RULE = ("the mean of the out-of-fold AUC and the out-of-fold mean within-stratum AUC "
                  "(the AUC alone where no stratum holds both classes), over patient-grouped, "
                  "class-stratified folds of the training images; ties go to the lower out-of-fold cross-entropy")


@dataclass(frozen=True)
class LogisticHead:
    """A fitted head: the standardisation and the softmax layer's weights, as Keras wants them
    (``kernel`` (features, classes), ``bias`` (classes,)); binary fits put zeros in class 0."""

    mean: np.ndarray
    variance: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray
    c: float

    def predict(self, pooled: np.ndarray) -> np.ndarray:
        z = (pooled - self.mean) / np.sqrt(self.variance) @ self.kernel + self.bias
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


def fit_logistic(pooled: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, c: float,
                 num_classes: int) -> LogisticHead:
    """Standardise (on these features) and fit the L2 logistic regression with lbfgs."""
    pooled, labels = np.asarray(pooled, np.float64), np.asarray(labels, int)
    mean, variance = pooled.mean(axis=0), pooled.var(axis=0)
    variance = np.where(variance > 1e-12, variance, 1.0)  # a dead channel stays 0 after centring
    x = (pooled - mean) / np.sqrt(variance)
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"logistic regression needs two classes among the training images, got {present.tolist()}")
    model = LogisticRegression(C=c, max_iter=100, tol=1e-6, solver="newton-cholesky")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # C=1 on 512 features converges slowly; close is fine
        model.fit(x, labels, sample_weight=weights)
    kernel = np.zeros((x.shape[1], num_classes))
    bias = np.zeros(num_classes)
    if len(present) == 2 and num_classes == 2:
        kernel[:, 1], bias[1] = model.coef_[0], model.intercept_[0]
    elif len(present) == 2:  # two of several classes: the others never win
        kernel[:, present[1]], bias[present[1]] = model.coef_[0], model.intercept_[0]
        bias[[k for k in range(num_classes) if k not in present]] = -1e4
    else:
        kernel[:, present], bias[present] = model.coef_.T, model.intercept_
        bias[[k for k in range(num_classes) if k not in present]] = -1e4
    return LogisticHead(mean, variance, kernel, bias, float(c))


def cross_validated_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> list[tuple]:
    """Patient-grouped folds stratified by class: no patient on both sides of any fold."""
    labels, groups = np.asarray(labels, int), np.asarray(groups)
    fewest = min(len(set(groups[labels == label])) for label in np.unique(labels))
    if fewest < 2:
        raise ValueError("cross-validation needs at least two patients of every class")
    folds = min(folds, fewest)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, np.asarray(groups)))


@dataclass
class HeadSelection:
    """What cross-validation chose, and the evidence: every candidate's out-of-fold scores, and the
    chosen one's out-of-fold probabilities (one row per training image), on which calibration and
    the threshold are fitted."""

    weighting: str
    features: str  # 'augmented' or 'plain'
    c: float
    auc: float
    within_auc: float | None
    score: float
    loss: float  # out-of-fold cross-entropy: breaks ties of the score
    oof: np.ndarray
    folds: int = 0

    def record(self) -> dict:
        return {"weighting": self.weighting, "features": self.features, "c": self.c, "cv_auc": self.auc,
                "cv_within_auc": self.within_auc, "cv_score": self.score, "cv_loss": self.loss, "folds": self.folds}


@dataclass
class Selection:
    """The best candidate overall (``head``) and the best on plain features (``baseline``: the
    plain logistic regression the model must not fall below), with every candidate's scores."""

    head: HeadSelection
    baseline: HeadSelection
    candidates: list[dict]
    rule: str = SELECTION_RULE

    def record(self) -> dict:
        return {"rule": self.rule, "chosen": self.head.record(), "baseline": self.baseline.record(),
                "candidates": self.candidates}


@dataclass(frozen=True)
class CrossValidation:
    """What cross-validation needs of the training images: their uint8 pixels, labels, patients
    (folds never split a patient), metadata levels (for the within-stratum AUC), and the candidate
    weightings (name -> levels to balance classes within, or None for class weights alone)."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    strata: dict[str, np.ndarray]
    weightings: dict[str, np.ndarray | None]
    mixed_only: bool = False
    rows: np.ndarray | None = None  # where these images sit in the caller's arrays
    class_weights: bool = True  # False: the 'none' weighting weighs every image alike

    def weights(self, weighting: str, rows: np.ndarray, num_classes: int) -> np.ndarray:
        """Weights of ``rows`` under ``weighting``, computed on those rows alone; ValueError when a
        class present there would get no weight (a fit could only learn that it never occurs)."""
        levels, labels = self.weightings[weighting], self.labels[rows]
        if levels is None:
            weights = (class_balanced_weights(labels, num_classes) if self.class_weights
                       else np.ones(len(rows)))
        else:
            weights = stratum_sample_weights(labels, np.asarray(levels)[rows], num_classes, self.mixed_only)
        for label in np.unique(labels):
            if not weights[labels == label].any():
                raise ValueError(f"weighting {weighting} leaves class {label} without weight in these images")
        return weights

    def folds_possible(self) -> int:
        """How many patient-grouped folds can hold every class on both sides: the fewest patients of
        any class (fewer than 2: cross-validation cannot run)."""
        groups = np.asarray(self.groups)
        return min(len(set(groups[self.labels == label])) for label in np.unique(self.labels))


def _score(is_positive: np.ndarray, scores: np.ndarray, strata: dict[str, np.ndarray]) -> tuple[float, float | None, float]:
    overall = auc(is_positive, scores)
    overall = 0.5 if overall is None else overall
    mean_within = mean_within_stratum_auc(is_positive, scores, strata)
    return overall, mean_within, overall if mean_within is None else (overall + mean_within) / 2


def _better(score: float, loss: float, best: HeadSelection) -> bool:
    """A higher score wins; an equal one (AUCs tie at 1.0 on separable data) goes to the lower
    out-of-fold cross-entropy, so a tie never keeps a needlessly flattened model."""
    if abs(score - best.score) > 1e-9:
        return score > best.score
    return loss < best.loss - 1e-9


def select_logistic_head(
    data: CrossValidation,
    plain: np.ndarray,
    draws: Sequence[np.ndarray],
    num_classes: int,
    positive_index: int,
    c_grid: Sequence[float] = C_GRID,
    folds: int = FOLDS,
    seed: int = 0,
    on_candidate: Callable[[dict], None] | None = None,
) -> Selection:
    """Cross-validate every (weighting, features, C) and keep the best by ``SELECTION_RULE``.

    ``plain``: pooled features of ``data.images`` as they are; ``draws``: the same under each
    augmentation draw, fitted together (each image once per draw); empty: plain features only.
    Held-out images are always scored on plain features, as screening will see them. Weights are
    computed on each fold's fitting images alone.
    """
    labels = np.asarray(data.labels, int)
    is_positive = labels == positive_index
    split = cross_validated_folds(labels, data.groups, folds, seed)
    options = ["plain", "augmented"] if len(draws) else ["plain"]
    best: dict[str, HeadSelection] = {}
    candidates = []
    for weighting in data.weightings:
        for features in options:
            stacks = [plain] if features == "plain" else list(draws)
            for c in sorted(c_grid):
                oof = np.zeros((len(labels), num_classes))
                try:
                    for fit_rows, held_rows in split:
                        w = data.weights(weighting, fit_rows, num_classes)
                        head = fit_logistic(np.concatenate([stack[fit_rows] for stack in stacks]),
                                            np.tile(labels[fit_rows], len(stacks)), np.tile(w, len(stacks)), c,
                                            num_classes)
                        oof[held_rows] = head.predict(plain[held_rows])
                except ValueError as error:  # e.g. --mixed-strata-only leaves a fold nothing to weight
                    found = {"weighting": weighting, "features": features, "c": c, "skipped": str(error)}
                    candidates.append(found)
                    if on_candidate is not None:
                        on_candidate(found)
                    continue
                oof_auc, within, score = _score(is_positive, oof[:, positive_index], data.strata)
                loss = float(-np.log(np.clip(oof[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())
                found = {"weighting": weighting, "features": features, "c": c, "cv_auc": oof_auc, "cv_within_auc": within,
                         "cv_score": score, "cv_loss": loss}
                candidates.append(found)
                if on_candidate is not None:
                    on_candidate(found)
                for kind in ("head", "baseline") if features == "plain" else ("head",):
                    if kind not in best or _better(score, loss, best[kind]):
                        best[kind] = HeadSelection(weighting, features, c, oof_auc, within, score, loss, oof, len(split))
    if "head" not in best or "baseline" not in best:
        reasons = sorted({row["skipped"] for row in candidates if "skipped" in row})
        raise ValueError("no candidate could be cross-validated" + (f": {'; '.join(reasons)}" if reasons else ""))
    return Selection(best["head"], best["baseline"], candidates)


def fit_selected(data: CrossValidation, plain: np.ndarray, draws: Sequence[np.ndarray], chosen: HeadSelection,
                 num_classes: int) -> LogisticHead:
    """The chosen candidate fitted on all the training images. scikit-learn's penalty is not
    divided by the number of images, so C is scaled by (k - 1) / k: the final fit is as regularised
    as the fold models whose out-of-fold predictions calibration and the threshold are fitted on."""
    stacks = [plain] if chosen.features == "plain" else list(draws)
    rows = np.arange(len(data.labels))
    w = data.weights(chosen.weighting, rows, num_classes)
    c = chosen.c * (chosen.folds - 1) / chosen.folds if chosen.folds > 1 else chosen.c
    return fit_logistic(np.concatenate(stacks), np.tile(data.labels, len(stacks)), np.tile(w, len(stacks)),
                        c, num_classes)
