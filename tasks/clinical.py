"""Prefect tasks of clinical validity: calibrate the model's probabilities, and audit what it
learned (metadata strata, a left-out level, masked lungs, where Grad-CAM looks)."""

from __future__ import annotations

import csv
import io

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import roc_auc_score

from model.anatomy import lung_share, mask_images
from model.calibration import apply_temperature_and_bias, brier_score, expected_calibration_error, fit_temperature_and_bias
from model.evaluation import choose_threshold, sensitivity_specificity
from model.gradcam import grad_cam
from model.plots import audit_png, mean_cam_png, reliability_png
from model.preprocessing import Preprocessing
from model.training import TrainingConfig, predict_probabilities
from model.validity import audit, shortcut_warnings
from store import storage
from store.datasets import DatasetError
from tasks.retrying import io_step
from tasks.train_steps import LabelledArrays, TrainingSplit, evaluate_model, fit_model, mean_within_auc, split_for_training
from templates import render

__all__ = ["audit_baseline", "audit_fold", "audit_model", "calibrate_model", "write_audit"]


def _auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(is_positive, scores)) if 0 < is_positive.sum() < len(is_positive) else None


def _set_calibration(model: keras.Model, temperature: float, bias: np.ndarray) -> None:
    """Bakes ``softmax(z / T + b)`` into the saved model: the final Dense's kernel divided by T and
    its bias divided by T plus b give exactly those logits, so screening writes calibrated
    probabilities with no extra code."""
    final = model.get_layer("head").get_layer("probabilities")
    final.kernel.assign(final.kernel / temperature)
    final.bias.assign(final.bias / temperature + bias.astype(np.float32))


@task(cache_policy=NO_CACHE)
def calibrate_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                    oof: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict, bytes | None, np.ndarray | None]:
    """Temperature (and class-bias) scaling baked into ``model``, fitted on ``oof`` (rows of the
    loaded arrays and the head's out-of-fold probabilities of them, from cross-validation) when
    given, else on the validation split. Returns the calibration record (temperature, ECE and Brier
    of the positive class before and after, on what it was fitted on and on test), a reliability
    diagram of the test split, and the calibrated out-of-fold probabilities (None without ``oof``),
    on which the threshold is then chosen."""
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
        return {}, None, None
    if _auc(fit_labels == positive, fit_before[:, positive]) == 1.0:
        # Perfectly separated: the likelihood only grows as probabilities go to 0 and 1, so a fitted
        # temperature would just make the model as over-confident as its bounds allow.
        get_run_logger().warning("Not calibrated: the %s images are perfectly separated, so calibration could only "
                                 "sharpen the probabilities to 0 and 1", fitted_on.replace("_", "-"))
        return {}, None, None
    test_before = predict_probabilities(model, loaded.images[split.test], spec)
    temperature, bias = fit_temperature_and_bias(fit_before, fit_labels)
    _set_calibration(model, temperature, bias)
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
    return record, figure, fit_after if oof is not None else None


@task(cache_policy=NO_CACHE)
def audit_baseline(split: TrainingSplit, baseline: dict, target_sensitivity: float, n_resamples: int = 1000,
                   seed: int = 0, calibrate: bool = True) -> dict:
    """The built-in baseline (a plain logistic regression on the model's own frozen features,
    model/linear_head.py) scored like the model on the test split: calibrated on its own
    out-of-fold predictions, its threshold chosen there for ``target_sensitivity``; overall and
    within-stratum figures with intervals, its operating point and ECE."""
    positive = split.classes.index(split.positive)
    rows, oof, test = baseline["oof_rows"], baseline["oof"], baseline["test_probabilities"]
    labels = split.labels[rows]
    if calibrate and len(np.unique(labels)) > 1 and _auc(labels == positive, oof[:, positive]) not in (None, 1.0):
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
            "mean_within_auc": mean_within_auc(split, split.test, scores),
            "ece": expected_calibration_error(truth, scores)}


@task(cache_policy=NO_CACHE)
def audit_model(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                threshold: float, test_probabilities: np.ndarray, n_resamples: int = 1000,
                seed: int = 0) -> tuple[dict, bytes]:
    """What the model learned, on the test split: metrics within metadata strata with patient-level
    bootstrap intervals and metadata-only baselines, the left-out level, the masked-lung audit and
    Grad-CAM's share inside the lungs. Returns the card's ``validity`` record and the mean Grad-CAM
    per class as a PNG."""
    logger = get_run_logger()
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
        masked[f"auc_{'lungs_blanked' if keep == 'outside' else 'only_lungs'}"] = _auc(truth, masked_scores)
    record["masked"] = {"method": "fixed anatomical prior: two lung-field boxes (model/anatomy.py), "
                                  f"blanked with the test images' mean grey ({fill})", "auc": record["overall"]["auc"],
                        **masked}
    lungs_blanked = masked["auc_lungs_blanked"]
    if lungs_blanked is not None and lungs_blanked >= 0.75:
        record["warnings"].append(f"with the lung fields blanked the test AUC is still {lungs_blanked:.2f}: "
                                  "the model reads something outside the lungs")

    if len(split.held_out):
        record["left_out"] = _held_out_metrics(model, loaded, split, spec, threshold)

    cams = grad_cam(model, loaded.images[test], spec, positive)
    shares = np.array([lung_share(cam) for cam in cams])
    record["gradcam"] = {"layer": "block5_conv3", "mean_lung_share": {
        name: _mean(shares[split.labels[test] == index]) for index, name in enumerate(split.classes)}}
    figure = mean_cam_png({name: cams[split.labels[test] == index] for index, name in enumerate(split.classes)},
                          {name: loaded.images[test][split.labels[test] == index] for index, name in enumerate(split.classes)})
    record["mean_within_auc"] = mean_within_auc(split, test, scores)
    # What promotion weighs: warnings about this model's scores (within-stratum gaps), measured the
    # same way for the production model on this split. A metadata-only baseline describes the data,
    # which both models share.
    record["model_warnings"] = shortcut_warnings(
        {"overall": record["overall"], "strata": {name: {"within_auc": found["within_auc"]}
                                                  for name, found in record["strata"].items()}})
    for line in record["warnings"]:
        logger.warning("Shortcut warning: %s", line)
    return record, figure


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
        split = split_for_training.fn(loaded, positive, multiclass, test_fraction, seed, strata=None,
                                      balance_strata=balance_strata, mixed_strata_only=mixed_strata_only,
                                      leave_out=f"{variable}={level}")
        _require_both_classes(split)
        cv = split.cross_validation(loaded.images, pooled=not config.fine_tune_epochs,
                                    class_weights=config.class_weights)
        fitted = fit_model.fn(split.training_data(loaded.images), spec, config, weights, cv)
        model = fitted.model
        split = split.balanced_by(fitted.balance) if fitted.balance in split.balance_candidates else split
        oof = None if fitted.oof is None else (fitted.oof_rows, fitted.oof)
        threshold, metrics, test_probabilities = evaluate_model.fn(model, loaded, split, spec, target_sensitivity, oof)
    except (ValueError, DatasetError) as error:
        get_run_logger().warning("Cannot train without %s=%s: %s", variable, level, error)
        return {**row, "positives": None, "auc": None, "note": f"not trainable without it: {error}"}
    test_scores = test_probabilities[:, split.classes.index(split.positive)]
    return {**row, **_held_out_metrics(model, loaded, split, spec, threshold),
            "test_auc": metrics["positive"]["auc"], "test_within_auc": mean_within_auc(split, split.test, test_scores),
            "train_images": int(len(split.train)), "threshold": threshold, "balanced_by": split.balance, "note": ""}


def _held_out_metrics(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                      threshold: float) -> dict:
    """How the model does on the level left out of training: AUC where both classes are there,
    sensitivity, specificity, share flagged and mean probability at the threshold."""
    variable, level = split.leave_out
    truth = split.is_positive[split.held_out]
    scores = predict_probabilities(model, loaded.images[split.held_out], spec)[:, split.classes.index(split.positive)]
    sensitivity, specificity = sensitivity_specificity(truth, scores >= threshold)
    return {"variable": variable, "level": level, "images": int(len(split.held_out)), "positives": int(truth.sum()),
            "auc": _auc(truth, scores), "sensitivity": None if np.isnan(sensitivity) else sensitivity,
            "specificity": None if np.isnan(specificity) else specificity,
            "flagged_share": float((scores >= threshold).mean()) if len(scores) else None,
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
