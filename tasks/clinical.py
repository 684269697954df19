"""Prefect tasks of clinical validity: calibrate the model's probabilities, and audit what it
learned (metadata strata, a left-out level, masked lungs, where Grad-CAM looks)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from model.acceptance import Acceptance, compare_with_baseline, judge
from model.anatomy import lung_share, mask_images, resized
from model.calibration import (
    apply_temperature_and_bias,
    brier_score,
    expected_calibration_error,
    fit_temperature_and_bias,
)
from model.evaluation import auc, choose_threshold, flags, sensitivity_specificity
from model.network import set_calibration
from model.plots import audit_png, mean_cam_png, reliability_png
from model.preprocessing import Preprocessing
from model.training import TrainingConfig, predict_probabilities
from model.validity import audit, shortcut_warnings
from store import storage
from store.datasets import DatasetError
from tasks.retrying import io_step
from tasks.train_data import LabelledArrays, TrainingSplit, build_split
from tasks.train_fit import fit
from tasks.train_scoring import Evaluation, evaluate_split
from templates import render

__all__ = ["Audit", "Calibration", "audit_baseline", "audit_fold", "audit_model", "calibrate_model", "judge_fitness",
           "write_audit"]


@dataclass(frozen=True)
class Calibration:
    """What calibration did: the card's record (empty when not calibrated), the test split's
    reliability diagram, and the calibrated out-of-fold probabilities the threshold is then chosen
    on (None without out-of-fold predictions)."""

    record: dict = field(default_factory=dict)
    figure: bytes | None = None
    oof: np.ndarray | None = None


@dataclass(frozen=True)
class Audit:
    """What the model learned, on the test split: the card's ``validity`` record (strata, masked
    lungs, Grad-CAM, left-out level; with the baseline and the fitness verdict once judged) and the
    mean Grad-CAM per class as a PNG."""

    validity: dict
    mean_cam: bytes | None = None


@task(cache_policy=NO_CACHE)
def calibrate_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                    oof: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Temperature (and class-bias) scaling baked into ``model``, fitted on ``oof`` (rows of the
    loaded arrays and the head's out-of-fold probabilities of them, from cross-validation) when
    given, else on the validation split. The record holds the temperature, and the ECE and Brier
    of the positive class before and after, on what it was fitted on and on test."""
    positive = split.classes.index(split.positive)
    if oof is not None:
        fit_rows, fit_before = oof
        fitted_on, method = "out_of_fold", ("temperature and class-bias scaling on out-of-fold predictions of the "
                                           f"{len(fit_rows)} training images (patient-grouped cross-validation)")
    else:
        fit_rows = split.validation
        fit_before = predict_probabilities(model, loaded.images[fit_rows], spec)
        fitted_on, method = "validation", "temperature and class-bias scaling on the validation split"
    fit_labels = split.labels[fit_rows]
    if len(np.unique(fit_labels)) < 2:
        get_run_logger().warning("Not calibrated: the %s images hold one class only", fitted_on.replace("_", "-"))
        return Calibration()
    if auc(fit_labels == positive, fit_before[:, positive]) == 1.0:
        # Perfectly separated: the likelihood only grows as probabilities go to 0 and 1, so a fitted
        # temperature would just make the model as over-confident as its bounds allow.
        get_run_logger().warning("Not calibrated: the %s images are perfectly separated, so calibration could only "
                                 "sharpen the probabilities to 0 and 1", fitted_on.replace("_", "-"))
        return Calibration()
    test_before = predict_probabilities(model, loaded.images[split.test], spec)
    temperature, bias = fit_temperature_and_bias(fit_before, fit_labels)
    set_calibration(model, temperature, bias)
    fit_after = apply_temperature_and_bias(fit_before, temperature, bias)
    test_after = predict_probabilities(model, loaded.images[split.test], spec)
    record: dict = {"method": method, "fitted_on": fitted_on, "temperature": temperature,
                    "bias": [float(value) for value in bias], "bins": 10}
    for name, rows, before, after in ((fitted_on, fit_rows, fit_before, fit_after),
                                      ("test", split.test, test_before, test_after)):
        truth = split.labels[rows] == positive
        record[name] = {f"{measure}_{when}": function(truth, probabilities[:, positive])
                        for when, probabilities in (("before", before), ("after", after))
                        for measure, function in (("ece", expected_calibration_error), ("brier", brier_score))}
    test_truth = split.labels[split.test] == positive
    figure = reliability_png(test_truth, test_before[:, positive], test_after[:, positive])
    get_run_logger().info("Calibration (on %s): temperature %.3f; test ECE %.3f -> %.3f, Brier %.3f -> %.3f",
                          fitted_on.replace("_", "-"), temperature, record["test"]["ece_before"],
                          record["test"]["ece_after"], record["test"]["brier_before"], record["test"]["brier_after"])
    return Calibration(record, figure, fit_after if oof is not None else None)


@task(cache_policy=NO_CACHE)
def judge_fitness(audited: Audit, split: TrainingSplit, baseline: dict | None, criteria: Acceptance,
                  n_resamples: int = 1000, seed: int = 0, calibrate: bool = True) -> Audit:
    """The audit completed with what promotion weighs: the built-in baseline scored like the model
    (when cross-validation fitted one) and set against it, and the verdict on the site's
    acceptance ``criteria`` (model/acceptance.py)."""
    validity = dict(audited.validity)
    if baseline is not None:
        validity["baseline"] = audit_baseline(split, baseline, criteria.target_sensitivity, n_resamples, seed,
                                              calibrate)
        validity["against_baseline"] = compare_with_baseline(
            {"auc": validity["overall"]["auc"], "mean_within_auc": validity["mean_within_auc"]},
            {"auc": validity["baseline"]["overall"]["auc"], "mean_within_auc": validity["baseline"]["mean_within_auc"]})
    validity["fitness"] = judge(validity["overall"], criteria).to_dict()
    return replace(audited, validity=validity)


def audit_baseline(split: TrainingSplit, baseline: dict, target_sensitivity: float, n_resamples: int = 1000,
                   seed: int = 0, calibrate: bool = True) -> dict:
    """The built-in baseline (a plain logistic regression on the model's own frozen features,
    model/linear_head.py) scored like the model on the test split: calibrated on its own
    out-of-fold predictions, its threshold chosen there for ``target_sensitivity``; overall and
    within-stratum figures with intervals, its operating point and ECE."""
    positive = split.classes.index(split.positive)
    rows, oof, test = baseline["oof_rows"], baseline["oof"], baseline["test_probabilities"]
    labels = split.labels[rows]
    if calibrate and len(np.unique(labels)) > 1 and auc(labels == positive, oof[:, positive]) not in (None, 1.0):
        temperature, bias = fit_temperature_and_bias(oof, labels)
        oof, test = (apply_temperature_and_bias(p, temperature, bias) for p in (oof, test))
    threshold = choose_threshold(labels == positive, oof[:, positive], target_sensitivity)
    truth, scores = split.is_positive[split.test], test[:, positive]
    train_rows = np.concatenate([split.train, split.validation])
    record = audit(truth, scores, threshold, {name: split.levels(name, split.test) for name in split.strata},
                   [split.patients[i] for i in split.test],
                   {name: split.levels(name, train_rows) for name in split.strata},
                   split.is_positive[train_rows], n_resamples=n_resamples, seed=seed)
    return {"method": "plain logistic regression on the frozen base's pooled features (scikit-learn, L2), chosen "
                      "by the same cross-validation as the head, " + ("calibrated and " if calibrate else "") +
                      "thresholded on its out-of-fold predictions",
            **baseline["record"], "threshold": threshold, "overall": record["overall"],
            "strata": {name: {key: found[key] for key in ("within_auc", "within_auc_ci")}
                       for name, found in record["strata"].items()},
            "mean_within_auc": split.mean_within_auc(split.test, scores),
            "ece": expected_calibration_error(truth, scores)}


@task(cache_policy=NO_CACHE)
def audit_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                evaluation: Evaluation, n_resamples: int = 1000, seed: int = 0) -> Audit:
    """What the model learned, on the test split: metrics within metadata strata with patient-level
    bootstrap intervals and metadata-only baselines, the left-out level, the masked-lung audit and
    Grad-CAM's share inside the lungs, at ``evaluation``'s threshold on its test probabilities."""
    logger = get_run_logger()
    threshold, test_probabilities = evaluation.threshold, evaluation.test_probabilities
    positive = split.classes.index(split.positive)
    test = split.test
    truth = split.is_positive[test]
    scores = test_probabilities[:, positive]
    train_rows = np.concatenate([split.train, split.validation])
    record = audit(truth, scores, threshold,
                   {name: split.levels(name, test) for name in split.strata},
                   [split.patients[i] for i in test],
                   {name: split.levels(name, train_rows) for name in split.strata},
                   split.is_positive[train_rows], n_resamples=n_resamples, seed=seed)

    masked = {}
    # One grey for every image: a per-image mean would carry the image's brightness (and an opacity's)
    # into the blanked area, and the audit would measure that leak.
    fill = int(round(float(loaded.images[test].mean())))
    for keep in ("outside", "lungs"):
        masked_images = mask_images(loaded.images[test], keep=keep, fill=fill)
        masked_scores = predict_probabilities(model, masked_images, spec)[:, positive]
        masked[f"auc_{'lungs_blanked' if keep == 'outside' else 'only_lungs'}"] = auc(truth, masked_scores)
    record["masked"] = {"method": "fixed anatomical prior: two lung-field boxes (model/anatomy.py), "
                                  f"blanked with the test images' mean grey ({fill})", "auc": record["overall"]["auc"],
                        **masked}
    lungs_blanked = masked["auc_lungs_blanked"]
    if lungs_blanked is not None and lungs_blanked >= 0.75:
        record["warnings"].append(f"with the lung fields blanked the test AUC is still {lungs_blanked:.2f}: "
                                  "the model reads something outside the lungs")

    if len(split.held_out):
        record["left_out"] = _held_out_metrics(model, loaded, split, spec, threshold)

    cams = np.stack([resized(cam, loaded.images.shape[1:3]) for cam in evaluation.test_cams]) if len(test) else \
        np.zeros((0, *loaded.images.shape[1:3]), np.float32)
    shares = np.array([lung_share(cam) for cam in cams])
    record["gradcam"] = {"layer": "block5_conv3", "mean_lung_share": {
        name: _mean(shares[split.labels[test] == index]) for index, name in enumerate(split.classes)}}
    figure = mean_cam_png({name: cams[split.labels[test] == index] for index, name in enumerate(split.classes)},
                          {name: loaded.images[test][split.labels[test] == index] for index, name in enumerate(split.classes)})
    record["mean_within_auc"] = split.mean_within_auc(test, scores)
    # What promotion weighs: warnings about this model's scores (within-stratum gaps), measured the
    # same way for the production model on this split. A metadata-only baseline describes the data,
    # which both models share.
    record["model_warnings"] = shortcut_warnings(
        {"overall": record["overall"], "strata": {name: {"within_auc": found["within_auc"]}
                                                  for name, found in record["strata"].items()}})
    for line in record["warnings"]:
        logger.warning("Shortcut warning: %s", line)
    return Audit(record, figure)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


@task(cache_policy=NO_CACHE, task_run_name="leave-out-{variable}={level}")
def audit_fold(loaded: LabelledArrays, variable: str, level: str, *, positive: str, multiclass: bool,
               test_fraction: float, seed: int, spec: Preprocessing, config: TrainingConfig, weights: str | None,
               target_sensitivity: float, balance_strata: str | None = "auto", mixed_strata_only: bool = False) -> dict:
    """Train without one level of ``variable`` (the train flow's recipe); score the level it never
    saw and the usual test split. A level whose absence leaves nothing to train on (it held every
    positive, say) is reported as such, not raised: the other folds still count."""
    row = {"variable": variable, "level": level, "images": int(sum(item.metadata.get(variable) == level
                                                                   for item in loaded.items))}
    try:
        split = build_split(loaded, positive, multiclass, test_fraction, seed, strata=None,
                            balance_strata=balance_strata, mixed_strata_only=mixed_strata_only,
                            leave_out=f"{variable}={level}", logger=get_run_logger())
        _require_both_classes(split)
        cv = split.cross_validation(loaded.images, pooled=not config.fine_tune_epochs,
                                    class_weights=config.class_weights)
        fitted = fit(split.training_data(loaded.images), spec, config, weights, cv)
        model = fitted.model
        split = split.balanced_by(fitted.balance) if fitted.balance in split.balance_candidates else split
        evaluation = evaluate_split(model, loaded, split, spec, target_sensitivity, fitted.oof_pairs)
    except (ValueError, DatasetError) as error:
        get_run_logger().warning("Cannot train without %s=%s: %s", variable, level, error)
        return {**row, "positives": None, "auc": None, "note": f"not trainable without it: {error}"}
    test_scores = evaluation.test_probabilities[:, split.classes.index(split.positive)]
    return {**row, **_held_out_metrics(model, loaded, split, spec, evaluation.threshold),
            "test_auc": evaluation.metrics["positive"]["auc"],
            "test_within_auc": split.mean_within_auc(split.test, test_scores),
            "train_images": len(split.train), "threshold": evaluation.threshold, "balanced_by": split.balance,
            "note": ""}


def _held_out_metrics(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                      threshold: float) -> dict:
    """How the model does on the level left out of training: AUC where both classes are there,
    sensitivity, specificity, share flagged and mean probability at the threshold."""
    variable, level = split.leave_out
    truth = split.is_positive[split.held_out]
    scores = predict_probabilities(model, loaded.images[split.held_out], spec)[:, split.classes.index(split.positive)]
    sensitivity, specificity = sensitivity_specificity(truth, flags(scores, threshold))
    return {"variable": variable, "level": level, "images": len(split.held_out), "positives": int(truth.sum()),
            "auc": auc(truth, scores), "sensitivity": None if np.isnan(sensitivity) else sensitivity,
            "specificity": None if np.isnan(specificity) else specificity,
            "flagged_share": float(flags(scores, threshold).mean()) if len(scores) else None,
            "mean_probability": float(scores.mean()) if len(scores) else None}


def _require_both_classes(split: TrainingSplit) -> None:
    for name, rows in (("training", split.train), ("validation", split.validation), ("test", split.test)):
        positives = int(split.is_positive[rows].sum())
        if positives in (0, len(rows)):
            raise ValueError(f"the {name} part would hold {'no' if positives == 0 else 'only'} "
                             f"{split.positive} images")


@task(**io_step(retry_delay_seconds=5))
def write_audit(output_uri: str, variable: str, folds: list[dict]) -> dict[str, str]:
    """The audit's table (CSV), plot and markdown, under ``output_uri``; also a Prefect artifact."""
    columns = ["level", "images", "positives", "auc", "sensitivity", "specificity", "flagged_share",
               "mean_probability", "test_auc", "test_within_auc", "train_images", "threshold", "balanced_by", "note"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if fold.get(k) is None else fold[k] for k in columns} for fold in folds)

    markdown = render("audit.md.j2", variable=variable, columns=columns, folds=folds)
    outputs = {name: storage.join(output_uri, f"audit-{variable}.{name.split('.')[-1]}")
               for name in ("table.csv", "plot.png", "report.md")}
    storage.write_bytes(outputs["table.csv"], text.getvalue().encode())
    storage.write_bytes(outputs["plot.png"], audit_png(folds, variable))
    storage.write_bytes(outputs["report.md"], markdown.encode())
    create_markdown_artifact(key="leave-one-out-audit", description=f"Leave-one-level-out audit by {variable}",
                             markdown=markdown + f"\nTable: `{outputs['table.csv']}`, plot: `{outputs['plot.png']}`\n")
    return outputs
