"""Prefect tasks of the training flow: data in, split, model fitted and scored."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from model.augmentation import build_augmentation
from model.bundle import BundleError
from model.devices import share_gpus
from model.evaluation import choose_threshold, evaluate
from model.inference import ENGINES, REDUCED_DECODE, EngineCheck, check_engine, choose_feature_base, make_predictor, quantize_int8
from model.linear_head import CrossValidation, fit_selected, select_logistic_head
from model.network import IMAGENET_FILE, build_classifier, set_linear_head
from model.preprocessing import Preprocessing
from model.training import TrainingConfig, TrainingData, extract_features, fine_tune, fit_head_cached, predict_probabilities
from model.validity import default_strata, metadata_baseline_auc, shortcut_warnings, stratum_sample_weights, within_stratum_auc
from store import registry, storage
from store.datasets import (
    Dataset,
    DatasetError,
    LabelledImage,
    Split,
    discover_dataset,
    find_duplicates,
    metadata_columns,
    training_parts,
)
from store.loading import load_images
from tasks.retrying import io_step

__all__ = ["EpochReporter", "LabelledArrays", "TrainingSplit", "class_layout", "discover", "evaluate_model",
           "build_split", "fit_model", "load_labelled", "mean_within_auc", "resolve_weights", "score_production", "split_for_training"]


LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledArrays:
    items: tuple[LabelledImage, ...]  # with sha256, in the order of ``images``
    images: np.ndarray  # resized uint8
    rejected: tuple[tuple[str, str], ...]  # (uri, reason)


@task(**io_step(retry_delay_seconds=5))
def discover(dataset_uri: str) -> Dataset:
    dataset = discover_dataset(dataset_uri)
    logger = get_run_logger()
    logger.info("Found %d labelled images in %s (%s): %s", len(dataset.items), dataset_uri, dataset.source,
                ", ".join(f"{k} {v}" for k, v in dataset.class_counts.items()))
    if dataset.ignored:
        logger.warning("Ignored %d file(s) that are not labelled images, e.g. %s", len(dataset.ignored), dataset.ignored[0])
    return dataset


# Reads and decodes every image of the dataset: a large one on S3 takes a while.
@task(**io_step(retry_delay_seconds=5, timeout_seconds=4 * 3600), cache_policy=NO_CACHE)
def load_labelled(items: tuple[LabelledImage, ...], spec: Preprocessing) -> LabelledArrays:
    """Read, hash, decode and resize every image; unusable ones are logged and left out."""
    logger = get_run_logger()
    loaded = load_images([item.uri for item in items], spec)
    kept, images, rejected = [], [], []
    for item, image in zip(items, loaded):
        if image.pixels is None:
            logger.warning("Left out %s: %s", image.uri, image.reason)
            rejected.append((image.uri, image.reason or ""))
            continue
        kept.append(replace(item, sha256=image.sha256))
        images.append(image.pixels)
    if not images:
        raise ValueError("no usable images: every file was rejected (see the warnings above)")
    logger.info("Loaded %d images at %dx%d (%d rejected)", len(images), spec.input_size, spec.input_size, len(rejected))
    return LabelledArrays(tuple(kept), np.stack(images), tuple(rejected))


def class_layout(items: tuple[LabelledImage, ...], positive: str, multiclass: bool) -> tuple[list[str], np.ndarray]:
    """Class names and integer labels: positive vs the rest, or one class per label."""
    present = sorted({item.label for item in items})
    if positive not in present:
        raise ValueError(f"positive class {positive!r} is not among the classes found: {', '.join(present)}")
    if multiclass:
        return present, np.array([present.index(item.label) for item in items])
    if len(present) < 2:
        raise ValueError(f"only the class {positive!r} was found: binary training needs other classes too")
    return [f"non-{positive}", positive], np.array([int(item.label == positive) for item in items])


@dataclass(frozen=True)
class TrainingSplit:
    """Classes, labels and the row numbers (into ``LabelledArrays``) of each part of the split,
    with the metadata strata of every image and, when strata are balanced, per-image weights."""

    classes: list[str]
    positive: str
    labels: np.ndarray
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    strata: dict[str, list[str]] = field(default_factory=dict)  # variable -> level of every loaded image
    patients: list[str] = field(default_factory=list)
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # rows of the left-out level
    leave_out: tuple[str, str] | None = None
    # Weightings that balance classes inside strata, by name ('age_group', 'age_group+source', 'none');
    # training tries each and keeps the best on validation (``balanced_by`` then records it).
    balance_candidates: dict[str, np.ndarray | None] = field(default_factory=dict)
    balance: str | None = None  # the stratum variable(s, joined by '+') balanced by ``weights``
    weights: np.ndarray | None = None  # per loaded image; set on train and validation rows only
    # The same weightings as levels of every loaded image (None: class weights alone), from which
    # cross-validation computes each fold's weights on its own fitting images.
    balance_levels: dict[str, np.ndarray | None] = field(default_factory=lambda: {"none": None})
    mixed_only: bool = False

    @property
    def is_positive(self) -> np.ndarray:
        return self.labels == self.classes.index(self.positive)

    def levels(self, variable: str, rows: np.ndarray) -> list[str]:
        return [self.strata[variable][i] for i in rows]

    def balanced_by(self, name: str) -> TrainingSplit:
        """This split with the weighting ``name`` (one of ``balance_candidates``) chosen."""
        weights = self.balance_candidates[name]
        return replace(self, balance=None if weights is None else name, weights=weights)

    def cross_validation(self, images: np.ndarray, pooled: bool, class_weights: bool = True) -> CrossValidation:
        """The training images for cross-validated choices: the training part, and with ``pooled``
        the validation part too (when nothing else needs validation, the choices, calibration and
        threshold get all of its images as out-of-fold predictions instead of one small split)."""
        rows = np.sort(np.concatenate([self.train, self.validation])) if pooled else self.train
        return CrossValidation(images[rows], self.labels[rows], np.array(self.patients, dtype=object)[rows],
                               {name: np.array(self.levels(name, rows)) for name in self.strata},
                               {name: None if levels is None else np.asarray(levels)[rows]
                                for name, levels in self.balance_levels.items()}, self.mixed_only, rows,
                               class_weights)

    def training_data(self, images: np.ndarray) -> TrainingData:
        """Training and validation arrays, every candidate weighting, and the validation images'
        strata, on whose within-stratum AUC training selects."""
        def part(weights, rows):
            return None if weights is None else weights[rows]

        return TrainingData(images[self.train], self.labels[self.train], images[self.validation],
                            self.labels[self.validation], len(self.classes),
                            part(self.weights, self.train), part(self.weights, self.validation),
                            val_strata={name: np.array(self.levels(name, self.validation)) for name in self.strata},
                            weightings=tuple((name, part(w, self.train), part(w, self.validation))
                                             for name, w in self.balance_candidates.items()
                                             if len(self.balance_candidates) > 1),
                            positive_index=self.classes.index(self.positive))


def joint_levels(columns: dict[str, list[str]], variables: str) -> list[str]:
    """Levels of one column, or of several joined by '+' (each image's levels, joined by ' | ')."""
    names = [name.strip() for name in variables.split("+")]
    for name in names:
        if name not in columns:
            raise DatasetError(f"no manifest column {name!r} to balance by "
                               f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    return [" | ".join(values) for values in zip(*(columns[name] for name in names))]


def _has_mixed_level(is_positive: np.ndarray, levels: list[str]) -> bool:
    levels = np.array(levels)
    return any(0 < is_positive[levels == level].sum() < (levels == level).sum() for level in set(levels))


def confounders(is_positive: np.ndarray, strata: dict[str, list[str]], limit: float = 0.6) -> str | None:
    """What 'auto' balances: every stratum variable that predicts the label on its own (metadata-only
    AUC on these training images of at least ``limit``), jointly ('age_group+source_dataset'), so
    that no combination of them says anything about the label. Falls back to the single strongest
    when no joint level holds both classes; None when no variable qualifies."""
    found = []
    for name, levels in strata.items():
        auc = metadata_baseline_auc(levels, is_positive, levels, is_positive)
        if auc is not None and auc >= limit and _has_mixed_level(is_positive, levels):
            found.append((auc, name))
    names = [name for _, name in sorted(found, reverse=True)]
    if len(names) > 1 and _has_mixed_level(is_positive, joint_levels(strata, "+".join(names))):
        return "+".join(names)
    return names[0] if names else None


def _parse_leave_out(leave_out: str | None, columns: dict[str, list[str]]) -> tuple[str, str] | None:
    if not leave_out:
        return None
    variable, _, level = leave_out.partition("=")
    variable, level = variable.strip(), level.strip()
    if variable not in columns:
        raise DatasetError(f"--leave-out {leave_out}: no manifest column {variable!r} "
                           f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    if level not in set(columns[variable]):
        raise DatasetError(f"--leave-out {leave_out}: {variable} has no level {level!r} "
                           f"(levels: {', '.join(sorted(set(columns[variable])))})")
    return variable, level


@task(cache_policy=NO_CACHE)
def split_for_training(loaded: LabelledArrays, positive: str, multiclass: bool, test_fraction: float, seed: int,
                       strata: list[str] | None = None, balance_strata: str | None = None,
                       mixed_strata_only: bool = False, leave_out: str | None = None) -> TrainingSplit:
    """Patient-held-out test split, then a validation part of the rest (the threshold is chosen on
    validation, never on test). ``leave_out`` ('COL=LEVEL') keeps a whole level out of all three,
    to measure how the model does on a source or site it never saw."""
    return build_split(loaded, positive, multiclass, test_fraction, seed, strata, balance_strata, mixed_strata_only,
                       leave_out, get_run_logger())


def build_split(loaded: LabelledArrays, positive: str, multiclass: bool, test_fraction: float, seed: int,
                strata: list[str] | None = None, balance_strata: str | None = None, mixed_strata_only: bool = False,
                leave_out: str | None = None, logger: logging.Logger | logging.LoggerAdapter = LOGGER) -> TrainingSplit:
    """``split_for_training``'s split, without Prefect (benches and notebooks call it)."""
    classes, labels = class_layout(loaded.items, positive, multiclass)
    columns = metadata_columns(loaded.items)
    chosen = default_strata(columns) if strata is None else list(strata)
    balance_strata = None if balance_strata in (None, "", "none") else balance_strata
    if balance_strata not in (None, "auto"):
        joint_levels(columns, balance_strata)  # refuses an unknown column before any work
    for name in chosen:
        if name not in columns:
            raise DatasetError(f"no manifest column {name!r} to stratify by "
                               f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    left_out = _parse_leave_out(leave_out, columns)
    parts = training_parts(loaded.items, test_fraction, seed, "=".join(left_out) if left_out else None)
    aside = {item.uri for item in parts.left_out}
    kept = [item for item in loaded.items if item.uri not in aside]
    for line in find_duplicates(kept, Split(parts.train + parts.validation, parts.test, seed, test_fraction)).lines():
        logger.warning("Duplicate: %s", line)
    position = {item.uri: i for i, item in enumerate(loaded.items)}

    def rows(part) -> np.ndarray:
        return np.array([position[item.uri] for item in part], dtype=int)

    train, validation = rows(parts.train), rows(parts.validation)
    is_positive = labels == classes.index(positive)
    if balance_strata == "auto":
        found = confounders(is_positive[train], {name: [columns[name][i] for i in train] for name in chosen})
        names = list(dict.fromkeys([*found.split("+"), found])) if found else []  # each, then jointly
    else:
        names = [balance_strata] if balance_strata else []
    candidates: dict[str, np.ndarray | None] = {}
    balance_levels: dict[str, np.ndarray | None] = {}
    for name in names:
        levels = np.array(joint_levels(columns, name))
        weights = np.zeros(len(labels))
        for part in (train, validation):
            weights[part] = stratum_sample_weights(labels[part], levels[part], len(classes), mixed_strata_only)
        candidates[name], balance_levels[name] = weights, levels
    if balance_strata == "auto" and candidates:
        candidates["none"] = None  # class weights only: it must beat the others to be kept
        logger.info("Balancing: each of %s is tried and the best kept", ", ".join(candidates))
    if not balance_levels or balance_strata == "auto":
        balance_levels["none"] = None
    held = rows(parts.left_out)
    result = TrainingSplit(classes, positive, labels, train, validation, rows(parts.test),
                           strata={name: columns[name] for name in chosen},
                           patients=[item.patient_id or item.uri for item in loaded.items],
                           held_out=held, leave_out=left_out, balance_candidates=candidates,
                           balance_levels=balance_levels, mixed_only=mixed_strata_only)
    if len(candidates) == 1:
        result = result.balanced_by(next(iter(candidates)))
    logger.info("Split by patient: %d train, %d validation, %d test images%s; strata: %s", len(train),
                len(validation), len(result.test),
                f", {len(held)} left out ({left_out[0]}={left_out[1]})" if left_out else "",
                ", ".join(chosen) or "none (no manifest columns)")
    return result


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


@task(cache_policy=NO_CACHE)
def fit_model(data: TrainingData, spec: Preprocessing, config: TrainingConfig, weights: str | None,
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
    return FitResult(model, history, chosen if chosen != "none" else None, features_engine, selection,
                     oof, None if oof is None else cv.rows, baseline)


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


@task(cache_policy=NO_CACHE)
def evaluate_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                   target_sensitivity: float, oof: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[float, dict, np.ndarray]:
    """The threshold, chosen for ``target_sensitivity`` on ``oof`` (rows of the loaded arrays and
    the model's calibrated out-of-fold probabilities of them) when given, else on the validation
    split; the test-split metrics and the test images' probabilities (which the audit reuses
    rather than predicting again)."""
    logger = get_run_logger()
    positive = split.classes.index(split.positive)
    if oof is not None:
        rows, chosen_on = oof
        source = f"out-of-fold predictions of {len(rows)} training images"
    else:
        rows, chosen_on = split.validation, predict_probabilities(model, loaded.images[split.validation], spec)
        source = "the validation split"
    # Unweighted: the target is a promise about real patients, whatever weights balanced training.
    threshold = choose_threshold(split.labels[rows] == positive, chosen_on[:, positive], target_sensitivity)
    test = predict_probabilities(model, loaded.images[split.test], spec)
    metrics = evaluate(split.labels[split.test], test, split.classes, split.positive, threshold)
    metrics["validation"] = {"images": int(len(rows)), "target_sensitivity": target_sensitivity,
                             "threshold_chosen_on": source}
    scores = metrics["positive"]
    logger.info("Test split: accuracy %.3f, %s AUC %s; threshold %.4f (chosen on %s) gives sensitivity %.3f, "
                "specificity %.3f", metrics["accuracy"], split.positive,
                "n/a" if scores["auc"] is None else f"{scores['auc']:.4f}", threshold, source,
                scores["sensitivity_at_threshold"], scores["specificity_at_threshold"])
    return threshold, metrics, test


# Enough images to place int8 ranges well; more only slows quantisation down.
CALIBRATION_IMAGES = 300


@task(cache_policy=NO_CACHE)
def check_engines(model: keras.Model, spec: Preprocessing, threshold: float, positive: int, test_images: np.ndarray,
                  test_labels: np.ndarray, reference: np.ndarray, calibration_images: np.ndarray,
                  test_uris: Sequence[str] = ()) -> tuple[list[EngineCheck], dict[str, bytes] | None]:
    """Every reduced-precision engine against fp32 on the test split (``reference``: fp32's
    probabilities of ``test_images``; ``test_labels``: their class indices; ``positive``: the
    flagged class): the gate an engine passes before it may serve this version
    (model/inference.py). int8 is quantised first, calibrated on ``calibration_images`` (training
    images only). With ``test_uris`` (the files of ``test_images``), reduced-resolution JPEG
    decoding is held to the same gate. Returns the checks and the int8 engine's files."""
    logger = get_run_logger()
    try:
        artifacts = quantize_int8(model, spec, calibration_images)
    except Exception as error:  # noqa: BLE001 - an optional engine must not cost the trained model
        logger.warning("int8 quantisation failed (%s: %s): the version will not have an int8 engine",
                       type(error).__name__, error)
        artifacts = {}
    checks = []
    for engine in ENGINES[1:]:
        if engine == "int8" and not artifacts:
            continue
        predictor = make_predictor(model, spec, engine, artifacts if engine == "int8" else None)
        candidate = predictor.predict(test_images)
        check = check_engine(engine, reference[:, positive], candidate[:, positive], (test_labels == positive).astype(int),
                             threshold)
        logger.info("Engine %s (%s)", check.summary, "passes" if check.passed else "FAILS the gate: never used")
        checks.append(check)
    if test_uris:
        shortcut = _check_reduced_decode(model, spec, threshold, positive, test_uris, test_images, test_labels, reference)
        if shortcut is not None:
            logger.info("Decoding %s (%s)", shortcut.summary, "passes" if shortcut.passed else "FAILS the gate: not used")
            checks.append(shortcut)
    return checks, artifacts or None


def _check_reduced_decode(model: keras.Model, spec: Preprocessing, threshold: float, positive: int,
                          uris: Sequence[str], images: np.ndarray, labels: np.ndarray,
                          reference: np.ndarray) -> EngineCheck | None:
    """The test images decoded again with the reduced-resolution JPEG shortcut, predicted by fp32,
    against the reference decode's predictions; None when no test image is a JPEG large enough."""
    from PIL import Image

    from imaging.decode import is_dicom
    from imaging.raster import reduction
    from imaging.sandbox import decode_isolated

    shortcut = images.copy()
    reduced = 0
    for index, uri in enumerate(uris):
        data = storage.read_bytes(uri)
        if is_dicom(data, uri) or not data.startswith(b"\xff\xd8"):
            continue
        with Image.open(io.BytesIO(data)) as header:
            if reduction("JPEG", header.width, header.height, spec.input_size) == 1:
                continue
        decoded = decode_isolated(data, uri, spec.input_size, 60.0, reduced=True)
        if decoded.pixels is not None:
            shortcut[index], reduced = decoded.pixels, reduced + 1
    if not reduced:
        return None
    candidate = predict_probabilities(model, shortcut, spec)
    return check_engine(REDUCED_DECODE, reference[:, positive], candidate[:, positive],
                        (labels == positive).astype(int), threshold)


def calibration_sample(train_rows: np.ndarray, seed: int) -> np.ndarray:
    """Up to CALIBRATION_IMAGES rows of the training part, drawn with the run's seed, in order."""
    return np.sort(np.random.default_rng(seed).permutation(train_rows)[:CALIBRATION_IMAGES])


@task(**io_step(retry_delay_seconds=5))
def resolve_weights(weights: str) -> tuple[str | None, dict]:
    """'imagenet', 'none', or a path/URI of a weights file copied to local disk for Keras."""
    if weights.lower() == "none":
        return None, {"origin": "none", "sha256": None}
    if weights.lower() == "imagenet":
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / IMAGENET_FILE
        digest = hashlib.sha256(cached.read_bytes()).hexdigest() if cached.exists() else None
        return "imagenet", {"origin": "imagenet", "sha256": digest}
    data = storage.read_bytes(weights)
    suffix = ".weights.h5" if weights.endswith(".weights.h5") else Path(weights).suffix or ".h5"
    local = tempfile.NamedTemporaryFile(prefix="vgg16-", suffix=suffix, delete=False)
    local.write(data)
    local.close()
    return local.name, {"origin": weights, "sha256": hashlib.sha256(data).hexdigest()}


@task(cache_policy=NO_CACHE)
def score_production(store_uri: str, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing) -> dict | None:
    """The production model's positive-class metrics on this test split, or None if not comparable."""
    logger = get_run_logger()
    if registry.production_version(store_uri) is None:
        return None
    try:
        model, card = registry.load_model(store_uri)
    except (BundleError, storage.StorageError, ValueError) as error:
        logger.warning("Production model could not be loaded, so it is not compared: %s", error)
        return None
    if card.classes != split.classes:
        logger.warning("Production model %s has classes %s, the new one %s: not comparable", card.version,
                       card.classes, split.classes)
        return None
    production_spec = card.spec()
    if production_spec.input_size == spec.input_size:  # stored images are resized uint8: scaling comes later
        images = loaded.images[split.test]
    else:
        uris = [loaded.items[i].uri for i in split.test]
        images = np.stack([image.pixels for image in load_images(uris, production_spec)])
    probabilities = predict_probabilities(model, images, production_spec)
    metrics = evaluate(split.labels[split.test], probabilities, split.classes, split.positive, card.threshold)["positive"]
    logger.info("Production model %s on this test split: AUC %s, sensitivity %.3f at its threshold",
                card.version, metrics["auc"], metrics["sensitivity_at_threshold"])
    scores = probabilities[:, split.classes.index(split.positive)]
    within = {name: within_stratum_auc(split.is_positive[split.test], scores, split.levels(name, split.test))
              for name in split.strata}
    # Its own model warnings, on this split (data warnings, from metadata alone, are the same for both).
    found = {"overall": {"auc": metrics["auc"]}, "strata": {k: {"within_auc": v} for k, v in within.items()}}
    present = [value for value in within.values() if value is not None]
    return {**metrics, "version": card.version, "warnings": shortcut_warnings(found),
            "within_auc": float(np.mean(present)) if present else None}


def mean_within_auc(split: TrainingSplit, rows: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean within-stratum AUC over the split's metadata variables (None without any)."""
    values = [within_stratum_auc(split.is_positive[rows], scores, split.levels(name, rows)) for name in split.strata]
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


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

