"""Training's scope step: what the model was trained on, so that screening can refuse what it was not.

The scope (model.scope) is fitted on the training and validation images (their pooled features,
patients kept within a fold; the orientation template from their pixels), then measured: the
false-rejection rate on the test split, and the rejection rate per kind on an out-of-scope set,
each with a 95 % Wilson interval. The out-of-scope set is the one given (``negatives_uri``: a
folder with one subfolder per kind) or, by default, one built here (store.out_of_scope, its
transformed X-rays made from the test images, which the fit has not seen).
"""

from __future__ import annotations

import collections
import math
import tempfile
from dataclasses import dataclass, field

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy.stats import binomtest

from model.drift_tests import Profile, image_statistics
from model.inference import make_predictor
from model.preprocessing import Preprocessing
from model.scope import MIN_FEATURE_IMAGES, REASONS, ScopeModel, fit_scope, scope_features
from store import storage
from store.loading import load_images
from store.out_of_scope import write_out_of_scope_set
from tasks.train_data import LabelledArrays, TrainingSplit

__all__ = ["OUT_OF_SCOPE_PER_KIND", "ScopeFit", "fit_scope_model", "rate", "test_split_profile"]

OUT_OF_SCOPE_PER_KIND = 20  # images of each kind in the set training builds


@dataclass
class ScopeFit:
    model: ScopeModel | None = None
    record: dict = field(default_factory=dict)  # the card's ``scope``
    # The gate's score and reason (a key of REASONS, None: passed) of each test image, in the split's order.
    test_scores: np.ndarray | None = None
    test_reasons: list[str | None] | None = None


def test_split_profile(loaded: LabelledArrays, split: TrainingSplit, test_probabilities: np.ndarray,
                       scope: ScopeFit) -> Profile:
    """What the test split looked like to the model, screening's drift reference until a site has
    nights of its own (screening/drift.py): the positive-class probabilities of the images the gate
    passed, every image's scope score, brightness and contrast, and the share and reasons refused."""
    reasons = scope.test_reasons if scope.test_reasons is not None else [None] * len(split.test)
    passed = np.array([reason is None for reason in reasons], bool)
    positive = split.classes.index(split.positive)
    statistics = image_statistics(loaded.images[split.test])
    values = {"probability": test_probabilities[passed, positive].tolist(),
              "image brightness": statistics[:, 0].tolist(), "image contrast": statistics[:, 1].tolist()}
    if scope.test_scores is not None:
        values["scope score"] = [float(score) for score in scope.test_scores if np.isfinite(score)]
    refused = collections.Counter(REASONS[reason] for reason in reasons if reason is not None)
    categories = {"rejected share": {"ok": int(passed.sum()), "rejected": int((~passed).sum())},
                  **({"rejection reasons": dict(refused)} if refused else {})}
    return Profile(values, categories).sample()


def rate(hits: int, total: int) -> dict:
    """A share with its 95 % Wilson interval, as the card records it."""
    if not total:
        return {"rate": None, "low": None, "high": None, "count": 0, "of": 0}
    interval = binomtest(hits, total).proportion_ci(method="wilson")
    return {"rate": round(hits / total, 4), "low": round(float(interval.low), 4),
            "high": round(float(interval.high), 4), "count": int(hits), "of": int(total)}


def features_of(model: keras.Model, spec: Preprocessing, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The pooled block5 features the head reads, by the float32 engine."""
    predictor = make_predictor(model, spec, "fp32")
    found = [scope_features(predictor.predict_with_maps(images[start : start + batch_size], batch_size)[1])
             for start in range(0, len(images), batch_size)]
    return np.concatenate(found) if found else np.zeros((0, 0), np.float32)


def _negatives(uri: str | None, spec: Preprocessing, test_images: np.ndarray, seed: int
               ) -> tuple[np.ndarray, list[str], list[str]]:
    """The out-of-scope images screening would decode (resized as it resizes them), their kinds, and
    the kinds of those it would refuse before the model (a flat image, say)."""
    with tempfile.TemporaryDirectory(prefix="out-of-scope-") as folder:
        if uri is None:
            greys = [image.mean(axis=2).astype(np.uint8) for image in test_images]
            write_out_of_scope_set(folder, OUT_OF_SCOPE_PER_KIND, greys, size=2 * spec.input_size, seed=seed)
            uri = folder
        files = sorted(storage.list_files(uri))
        kinds = [storage.relative_to(file, uri).split("/")[0].replace("-", " ") for file in files]
        loaded = load_images(files, spec)
    kept = [(item.pixels, kind) for item, kind in zip(loaded, kinds) if item.pixels is not None]
    refused = [kind for item, kind in zip(loaded, kinds) if item.pixels is None]
    if not kept:
        raise ValueError(f"no decodable out-of-scope images under {uri}")
    return np.stack([pixels for pixels, _ in kept]), [kind for _, kind in kept], refused


def _refusals(reasons: list[str | None]) -> dict:
    """The share refused (``rate``) and the count of each reason given (keys of model.scope.REASONS,
    or 'loader': refused before the model)."""
    counted = collections.Counter(reason for reason in reasons if reason)
    return {**rate(sum(counted.values()), len(reasons)),
            "reasons": {REASONS.get(key, "refused before the model"): count for key, count in counted.most_common()}}


@task(cache_policy=NO_CACHE)
def fit_scope_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                    pass_rate: float, negatives_uri: str | None = None, seed: int = 0,
                    pooled: tuple[np.ndarray, np.ndarray] | None = None, test_pooled: np.ndarray | None = None
                    ) -> ScopeFit:
    """``pooled`` (rows, features) and ``test_pooled``: the saved model's pooled features that
    training computed already (tasks.train_fit.FitResult); computed here where None."""
    logger = get_run_logger()
    if pooled is None:
        rows = np.sort(np.concatenate([split.train, split.validation]))
        features = features_of(model, spec, loaded.images[rows])
    else:
        rows, features = pooled
    groups = np.array([loaded.items[row].patient_id or loaded.items[row].sha256 for row in rows])
    try:
        scope = fit_scope(features, groups, pass_rate, pixels=loaded.images[rows])
    except ValueError as error:  # too few images or patients to say what is typical
        logger.warning("No scope gate for this version (%s): screening will score every image that decodes", error)
        return ScopeFit()
    test_images = loaded.images[split.test]
    test_features = features_of(model, spec, test_images) if test_pooled is None else test_pooled
    test_scores, test_reasons = scope.judge(test_images, test_features)
    negatives, kinds, refused = _negatives(negatives_uri, spec, test_images, seed)
    _, negative_reasons = scope.judge(negatives, features_of(model, spec, negatives))
    kinds, negative_reasons = kinds + refused, negative_reasons + ["loader"] * len(refused)
    per_kind = {kind: _refusals([reason for reason, named in zip(negative_reasons, kinds) if named == kind])
                for kind in dict.fromkeys(kinds)}
    record = {
        "pass_rate": pass_rate, "calibration_images": scope.calibration_images,
        # None: too few training images for the feature score to refuse anything (model.scope.MIN_FEATURE_IMAGES)
        "threshold": round(scope.threshold, 4) if math.isfinite(scope.threshold) else None,
        "test_false_rejection": _refusals(test_reasons),
        "out_of_scope": {"source": negatives_uri or "built (store.out_of_scope)",
                         "rejection": rate(sum(reason is not None for reason in negative_reasons), len(kinds)),
                         "kinds": per_kind},
    }
    false_rejection = record["test_false_rejection"]
    if not math.isfinite(scope.threshold):
        logger.warning("Scope: %d training images are too few for the feature score to refuse anything (at least %d): "
                       "only the pixel and layout checks refuse images", scope.calibration_images, MIN_FEATURE_IMAGES)
    logger.info("Scope: threshold %.1f (%.1f %% of training images' out-of-fold scores pass); test X-rays refused "
                "%d of %d (%.1f %%, 95 %% CI %.1f-%.1f %%); out-of-scope set refused %d of %d (%s)",
                scope.threshold, 100 * pass_rate, false_rejection["count"], false_rejection["of"],
                100 * false_rejection["rate"], 100 * false_rejection["low"], 100 * false_rejection["high"],
                record["out_of_scope"]["rejection"]["count"], len(kinds),
                ", ".join(f"{kind} {figures['count']}/{figures['of']}" for kind, figures in per_kind.items()))
    return ScopeFit(scope, record, np.asarray(test_scores, float), list(test_reasons))
