"""Prefect tasks of fitting: the head chosen by cross-validation (or trained with epochs), the
built-in baseline beside it, then optionally block5 fine-tuned; progress shown in the Prefect UI."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from model.augmentation import build_augmentation
from model.devices import share_gpus
from model.inference import (
    choose_feature_base,
)
from model.linear_head import CrossValidation, fit_selected, select_logistic_head
from model.network import build_classifier, set_linear_head
from model.preprocessing import Preprocessing
from model.training import (
    TrainingConfig,
    TrainingData,
    extract_features,
    fine_tune,
    fit_head_cached,
)

__all__ = ["EpochReporter", "FitResult", "fit", "fit_model"]


@dataclass
class FitResult:
    """What fitting produced: the model and its history; the weighting kept (None: class weights);
    which engine computed stage 1's features; what cross-validation chose and measured
    (``selection``); the head's out-of-fold probabilities of the cross-validation images (rows
    ``oof_rows`` of the loaded arrays), on which calibration and the threshold are fitted when the
    head came from cross-validation and no later stage changed it; and the built-in baseline."""

    model: keras.Model
    history: dict
    balance: str | None
    features_engine: dict
    selection: dict | None = None
    oof: np.ndarray | None = None
    oof_rows: np.ndarray | None = None
    baseline: dict | None = None  # oof, oof_rows, test probabilities, record (model.linear_head.Selection)
    # The saved model's pooled base features of the cross-validation images (rows into the loaded
    # arrays, features) and of the test images, where no later stage changed the base: the scope gate
    # (tasks/scope_fitting.py) is fitted on them with no second pass. None otherwise.
    pooled: tuple[np.ndarray, np.ndarray] | None = None
    test_pooled: np.ndarray | None = None

    @property
    def oof_pairs(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, out-of-fold probabilities), on which calibration and the threshold are fitted; None
        when the head did not come from cross-validation or a later stage changed it."""
        return None if self.oof is None else (self.oof_rows, self.oof)


def fit(data: TrainingData, spec: Preprocessing, config: TrainingConfig, weights: str | None,
        cv: CrossValidation | None = None, test_images: np.ndarray | None = None,
        cross_validated_head: bool = True) -> FitResult:
    """Stage 1, then stage 2 (block5) when fine-tune epochs are asked for.

    With ``cv`` (the training images for cross-validation), stage 1 of the linear head is a
    logistic regression chosen by patient-grouped cross-validation on cached pooled features
    (model/linear_head.py), and the plain logistic regression on the same features is fitted as the
    built-in baseline and scored on ``test_images``. Without ``cross_validated_head`` (the MLP head,
    or synthetic images in training), stage 1 trains with epochs on ``data`` and validation as before;
    the baseline is still fitted."""
    logger = get_run_logger()
    keras.utils.set_random_seed(config.seed)
    share_gpus()
    linear = config.head == "linear"
    model = build_classifier(data.num_classes, spec.input_size, weights, seed=config.seed, head=config.head,
                             l2=config.head_l2[0] if linear else 0.0)
    total = config.epochs + config.fine_tune_epochs
    started = time.perf_counter()
    reporter = EpochReporter("stage 1 (head, cached features)", config.epochs, total)
    feature_base, features_engine = choose_feature_base(model.get_layer("vgg16"), data.x_train[: config.batch_size], spec)
    logger.info("Stage 1 features by %s (%s img/s; bf16 features differ from fp32 by %.2f %%, median)",
                features_engine["engine"], features_engine["images_per_second"],
                100 * features_engine["bf16_median_relative_difference"])
    history: dict = {}
    chosen = selection = oof = baseline = None
    if cv is not None and cv.folds_possible() < 2:
        logger.warning("No cross-validation (a class has fewer than two patients among the training images): the "
                       "head trains with epochs on validation, and there is no built-in baseline")
        cv = None
    if cv is not None:
        # The model's own fp32 base: the head and the baseline are fitted on the very features the
        # saved model computes, so their out-of-fold probabilities are the served model's.
        plain, draws = _pooled_features(model.get_layer("vgg16"), cv.images, spec, config,
                                        augmented=cross_validated_head and linear and config.augment_head,
                                        log=logger, started=started)
        done = []

        def on_candidate(found: dict) -> None:
            done.append(found)
            if "skipped" in found:
                logger.warning("Cross-validation candidate %s: weighting %s, %s features, C %g skipped: %s", len(done),
                               found["weighting"], found["features"], found["c"], found["skipped"])
                return
            logger.info("Cross-validated %s: weighting %s, %s features, C %g: out-of-fold AUC %.3f, within-stratum %s",
                        len(done), found["weighting"], found["features"], found["c"], found["cv_auc"],
                        "n/a" if found["cv_within_auc"] is None else f"{found['cv_within_auc']:.3f}")

        cross = select_logistic_head(cv, plain, draws, data.num_classes, data.positive_index, seed=config.seed,
                                     on_candidate=on_candidate)
        record = cross.record()
        fitted_baseline = fit_selected(cv, plain, [], cross.baseline, data.num_classes)
        test_plain = (_pooled_features(model.get_layer("vgg16"), test_images, spec, config, augmented=False)[0]
                      if test_images is not None and len(test_images) else np.zeros((0, plain.shape[1])))
        baseline = {"oof": cross.baseline.oof, "oof_rows": cv.rows, "record": record["baseline"],
                    "test_probabilities": fitted_baseline.predict(test_plain) if len(test_plain) else None}
        if cross_validated_head and linear:
            head = fit_selected(cv, plain, draws, cross.head, data.num_classes)
            set_linear_head(model, head.mean, head.variance, head.kernel, head.bias)
            # Stage 2 keeps the head's penalty: scikit-learn's 1 / (2 C) on the sum of the losses is
            # 1 / (2 C n) on Keras' mean.
            fitted_rows = len(cv.labels) * (len(draws) if cross.head.features == "augmented" else 1)
            model.get_layer("head").get_layer("probabilities").kernel.regularizer = keras.regularizers.L2(
                1.0 / (2.0 * head.c * fitted_rows))
            chosen, oof, selection = cross.head.weighting, cross.head.oof, record
            logger.info("Cross-validation (%d patient-grouped folds over %d images) chose weighting %s, %s features, "
                        "C %g (out-of-fold AUC %.3f)", cross.head.folds, len(cv.labels), cross.head.weighting,
                        cross.head.features, cross.head.c, cross.head.auc)
            history["stage1"] = {"cross_validation": record["candidates"]}
        else:  # the head trains below; only the baseline came from cross-validation
            selection = {"rule": record["rule"], "baseline": record["baseline"], "candidates": record["candidates"]}
        logger.info("Built-in baseline: weighting %s, C %g (out-of-fold AUC %.3f)", cross.baseline.weighting,
                    cross.baseline.c, cross.baseline.auc)
    if "stage1" not in history:
        history["stage1"] = _fit_stage1_epochs(model, data, spec, config, reporter, feature_base, logger, started)
        chosen = history["stage1"].pop("selected_weighting_name", None)
        if chosen is not None:
            index = [name for name, _, _ in data.weightings].index(chosen)
            _, w_train, w_val = data.weightings[index]
            data = replace(data, w_train=w_train, w_val=w_val, weightings=())  # stage 2 trains the same way
    else:
        update_progress_artifact(reporter.artifact_id, 100.0 * config.epochs / max(total, 1))
    if config.fine_tune_epochs:
        if chosen is not None and data.weightings:
            names = [name for name, _, _ in data.weightings]
            if chosen in names:
                _, w_train, w_val = data.weightings[names.index(chosen)]
                data = replace(data, w_train=w_train, w_val=w_val, weightings=())
        tuner = EpochReporter("stage 2 (block5 fine-tuning)", config.fine_tune_epochs, total, config.epochs,
                              reporter.artifact_id)
        # Mixed precision where stage 1 found bf16 faster here and its features agreeing with fp32's.
        policy = "mixed_bfloat16" if features_engine["engine"] == "bf16" else "float32"
        features_engine = {**features_engine, "fine_tune_policy": policy}
        logger.info("Stage 2 computes under %s", policy)
        history["stage2"] = fine_tune(model, data, spec, config, [tuner], policy)
        oof = None  # stage 2 changed the features: calibration and threshold go back to validation
    logger.info("Training took %.0f s", time.perf_counter() - started)
    history = {stage: {k: (values if k == "cross_validation" else [float(v) for v in values])
                       for k, values in h.items()} for stage, h in history.items()}
    unchanged = cv is not None and not config.fine_tune_epochs and cv.rows is not None
    return FitResult(model, history, chosen if chosen != "none" else None, features_engine, selection,
                     oof, None if oof is None else cv.rows, baseline,
                     (cv.rows, plain) if unchanged else None, test_plain if unchanged and len(test_plain) else None)


fit_model = task(name="fit_model", cache_policy=NO_CACHE)(fit)


def _pooled_features(base: keras.Model, images: np.ndarray, spec: Preprocessing, config: TrainingConfig,
                     augmented: bool, log=None, started: float = 0.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pooled base features of ``images`` as they are, and (``augmented``) under each draw."""
    plain = extract_features(base, images, spec, None, config.batch_size).mean(axis=(1, 2))
    draws = []
    if augmented and config.augment:
        augmentation = build_augmentation(config.augmentation, config.seed)
        for draw in range(config.augment_draws):
            draws.append(extract_features(base, images, spec, augmentation, config.batch_size).mean(axis=(1, 2)))
            if log is not None:
                log.info("Computed base features of the training images: draw %d/%d (%.0f s)", draw + 1,
                         config.augment_draws, time.perf_counter() - started)
    return plain, draws


def _fit_stage1_epochs(model, data, spec, config, reporter, feature_base, logger, started) -> dict:
    """Stage 1 trained with epochs of Adam on cached features, chosen on validation."""
    def on_features(draw: int, draws: int) -> None:
        logger.info("Computed base features of the training images: draw %d/%d (%.0f s)", draw, draws,
                    time.perf_counter() - started)

    found = fit_head_cached(model, data, spec, config, [reporter], on_features, feature_base)
    if "selected_weighting" in found:
        found["selected_weighting_name"] = data.weightings[int(found.pop("selected_weighting")[0])][0]
        logger.info("Balancing %s did best on validation", found["selected_weighting_name"])
    if "selected_l2" in found:
        logger.info("Linear head: L2 %g did best on validation among %s", found["selected_l2"][0], list(config.head_l2))
    return found


class EpochReporter(keras.callbacks.Callback):
    """Logs each epoch through Prefect and moves a progress artifact (0-100 over all epochs)."""

    def __init__(self, stage: str, epochs: int, total_epochs: int, done_before: int = 0, artifact_id=None) -> None:
        super().__init__()
        self.stage, self.epochs, self.total, self.done_before = stage, epochs, total_epochs, done_before
        self.artifact_id = artifact_id or create_progress_artifact(
            0.0, key="training-progress", description="Training epochs completed"
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if isinstance(v, (int, float)))
        get_run_logger().info("%s epoch %d/%d: %s", self.stage, epoch + 1, self.epochs, shown)
        progress = 100.0 * (self.done_before + epoch + 1) / max(self.total, 1)
        update_progress_artifact(self.artifact_id, min(progress, 100.0))
