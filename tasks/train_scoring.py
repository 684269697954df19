"""Prefect tasks that score a fitted model: the operating point and the test split, the fast engines
held to fp32 on the same images, and production re-scored there for the comparison."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.bundle import BundleError
from model.evaluation import choose_threshold
from model.evaluation import evaluate as test_metrics
from model.gradcam import predict_and_explain
from model.inference import (
    ENGINES,
    REDUCED_DECODE,
    EngineCheck,
    check_engine,
    make_predictor,
    quantize_int8,
)
from model.preprocessing import Preprocessing
from model.training import (
    predict_probabilities,
)
from model.validity import (
    shortcut_warnings,
    within_stratum_auc,
)
from store import registry, storage
from store.loading import load_images
from tasks.train_data import LabelledArrays, TrainingSplit

__all__ = ["CALIBRATION_IMAGES", "EngineReport", "Evaluation", "calibration_sample", "check_engines", "evaluate_model", "evaluate_split", "score_production"]


@dataclass(frozen=True)
class Evaluation:
    """The operating point and the test split's figures: the threshold (chosen on out-of-fold
    predictions or on validation, never on test), the metrics, and the test images' probabilities
    (which the audit and the engine checks reuse rather than predicting again)."""

    threshold: float
    metrics: dict
    test_probabilities: np.ndarray
    # Grad-CAM of the positive class from the same float32 pass, at the maps' resolution: the audit
    # and the explanation gate read it rather than passing over the test images again.
    test_cams: np.ndarray


def evaluate_split(model: keras.Model, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
             target_sensitivity: float, oof: tuple[np.ndarray, np.ndarray] | None = None) -> Evaluation:
    """The threshold, chosen for ``target_sensitivity`` on ``oof`` (rows of the loaded arrays and
    the model's calibrated out-of-fold probabilities of them) when given, else on the validation
    split; then the test split scored at it."""
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
    test, test_cams = predict_and_explain(make_predictor(model, spec, "fp32"), model, loaded.images[split.test], positive)
    metrics = test_metrics(split.labels[split.test], test, split.classes, split.positive, threshold)
    metrics["validation"] = {"images": len(rows), "target_sensitivity": target_sensitivity,
                             "threshold_chosen_on": source}
    scores = metrics["positive"]
    logger.info("Test split: accuracy %.3f, %s AUC %s; threshold %.4f (chosen on %s) gives sensitivity %.3f, "
                "specificity %.3f", metrics["accuracy"], split.positive,
                "n/a" if scores["auc"] is None else f"{scores['auc']:.4f}", threshold, source,
                scores["sensitivity_at_threshold"], scores["specificity_at_threshold"])
    return Evaluation(threshold, metrics, test, test_cams)


evaluate_model = task(name="evaluate_model", cache_policy=NO_CACHE)(evaluate_split)


# Enough images to place int8 ranges well; more only slows quantisation down.
CALIBRATION_IMAGES = 300


@dataclass(frozen=True)
class EngineReport:
    """The engine checks of a version (model.inference.EngineCheck) and the int8 engine's files."""

    checks: list[EngineCheck]
    files: dict[str, bytes] | None


@task(cache_policy=NO_CACHE)
def check_engines(model: keras.Model, spec: Preprocessing, loaded: LabelledArrays, split: TrainingSplit,
                  threshold: float, seed: int, reference: Evaluation | None = None) -> EngineReport:
    """Every reduced-precision engine against fp32 on the split's test images: the gate an engine
    passes before it may serve this version (model/inference.py), and the gate its explanations pass
    before its own maps explain. ``reference``: the evaluation of the test images (fp32's
    probabilities and Grad-CAM), when already made. int8 is quantised first, calibrated on a sample
    of the training part (``calibration_sample``, drawn with ``seed``). Reduced-resolution JPEG
    decoding of the test files is held to the same gate."""
    logger = get_run_logger()
    positive = split.classes.index(split.positive)
    test_images, test_labels = loaded.images[split.test], split.labels[split.test]
    if reference is None:
        probabilities, cams = predict_and_explain(make_predictor(model, spec, "fp32"), model, test_images, positive)
    else:
        probabilities, cams = reference.test_probabilities, reference.test_cams
    try:
        artifacts = quantize_int8(model, spec, loaded.images[calibration_sample(split.train, seed)])
    except Exception as error:  # noqa: BLE001 - an optional engine must not cost the trained model
        logger.warning("int8 quantisation failed (%s: %s): the version will not have an int8 engine",
                       type(error).__name__, error)
        artifacts = {}
    checks = []
    for engine in ENGINES[1:]:
        if engine == "int8" and not artifacts:
            continue
        predictor = make_predictor(model, spec, engine, artifacts if engine == "int8" else None)
        candidate, candidate_cams = predict_and_explain(predictor, model, test_images, positive)
        check = check_engine(engine, probabilities[:, positive], candidate[:, positive],
                             (test_labels == positive).astype(int), threshold,
                             None if candidate_cams is None else (cams, candidate_cams), test_images.shape[1:3])
        logger.info("Engine %s (%s)", check.summary, "passes" if check.passed else "FAILS the gate: never used")
        checks.append(check)
    test_uris = [loaded.items[index].uri for index in split.test]
    shortcut = _check_reduced_decode(model, spec, threshold, positive, test_uris, test_images, test_labels,
                                     probabilities)
    if shortcut is not None:
        logger.info("Decoding %s (%s)", shortcut.summary, "passes" if shortcut.passed else "FAILS the gate: not used")
        checks.append(shortcut)
    return EngineReport(checks, artifacts or None)


def _check_reduced_decode(model: keras.Model, spec: Preprocessing, threshold: float, positive: int,
                          uris: Sequence[str], images: np.ndarray, labels: np.ndarray,
                          reference: np.ndarray) -> EngineCheck | None:
    """The test images decoded again with the reduced-resolution JPEG shortcut, predicted by fp32,
    against the reference decode's predictions; None when no test image is a JPEG large enough."""
    from PIL import Image

    from imaging.decode import is_dicom
    from imaging.defaults import DECODE_TIMEOUT_SECONDS
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
        decoded = decode_isolated(data, uri, spec.input_size, DECODE_TIMEOUT_SECONDS, reduced=True)
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
    metrics = test_metrics(split.labels[split.test], probabilities, split.classes, split.positive, card.threshold)["positive"]
    logger.info("Production model %s on this test split: AUC %s, sensitivity %.3f at its threshold",
                card.version, metrics["auc"], metrics["sensitivity_at_threshold"])
    scores = probabilities[:, split.classes.index(split.positive)]
    within = {name: within_stratum_auc(split.is_positive[split.test], scores, split.levels(name, split.test))
              for name in split.strata}
    # Its own model warnings, on this split (data warnings, from metadata alone, are the same for both).
    found = {"overall": {"auc": metrics["auc"]}, "strata": {k: {"within_auc": v} for k, v in within.items()}}
    return {**metrics, "version": card.version, "warnings": shortcut_warnings(found),
            "within_auc": split.mean_within_auc(split.test, scores)}
