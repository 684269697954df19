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
from model.defaults import BATCH_SIZE
from model.evaluation import choose_threshold
from model.evaluation import evaluate as test_metrics
from model.gradcam import cams_from_maps
from model.inference import (
    ENGINES,
    REDUCED_DECODE,
    EngineCheck,
    Predictor,
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
    test = predict_probabilities(model, loaded.images[split.test], spec)
    metrics = test_metrics(split.labels[split.test], test, split.classes, split.positive, threshold)
    metrics["validation"] = {"images": len(rows), "target_sensitivity": target_sensitivity,
                             "threshold_chosen_on": source}
    scores = metrics["positive"]
    logger.info("Test split: accuracy %.3f, %s AUC %s; threshold %.4f (chosen on %s) gives sensitivity %.3f, "
                "specificity %.3f", metrics["accuracy"], split.positive,
                "n/a" if scores["auc"] is None else f"{scores['auc']:.4f}", threshold, source,
                scores["sensitivity_at_threshold"], scores["specificity_at_threshold"])
    return Evaluation(threshold, metrics, test)


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
                  threshold: float, seed: int, reference: np.ndarray | None = None) -> EngineReport:
    """Every reduced-precision engine against fp32 on the split's test images: the gate an engine
    passes before it may serve this version (model/inference.py). ``reference``: fp32's
    probabilities of the test images, when already computed. int8 is quantised first, calibrated
    on a sample of the training part (``calibration_sample``, drawn with ``seed``). Reduced-resolution
    JPEG decoding of the test files is held to the same gate."""
    logger = get_run_logger()
    positive = split.classes.index(split.positive)
    test_images, test_labels = loaded.images[split.test], split.labels[split.test]
    if reference is None:
        reference = predict_probabilities(model, test_images, spec)
    try:
        artifacts = quantize_int8(model, spec, loaded.images[calibration_sample(split.train, seed)])
    except Exception as error:  # noqa: BLE001 - an optional engine must not cost the trained model
        logger.warning("int8 quantisation failed (%s: %s): the version will not have an int8 engine",
                       type(error).__name__, error)
        artifacts = {}
    checks = []
    _, reference_cams = _probabilities_and_cams(make_predictor(model, spec, "fp32"), model, test_images, positive)
    for engine in ENGINES[1:]:
        if engine == "int8" and not artifacts:
            continue
        predictor = make_predictor(model, spec, engine, artifacts if engine == "int8" else None)
        candidate, cams = _probabilities_and_cams(predictor, model, test_images, positive)
        check = check_engine(engine, reference[:, positive], candidate[:, positive], (test_labels == positive).astype(int),
                             threshold, None if cams is None else (reference_cams, cams))
        logger.info("Engine %s (%s)", check.summary, "passes" if check.passed else "FAILS the gate: never used")
        checks.append(check)
    test_uris = [loaded.items[index].uri for index in split.test]
    shortcut = _check_reduced_decode(model, spec, threshold, positive, test_uris, test_images, test_labels, reference)
    if shortcut is not None:
        logger.info("Decoding %s (%s)", shortcut.summary, "passes" if shortcut.passed else "FAILS the gate: not used")
        checks.append(shortcut)
    return EngineReport(checks, artifacts or None)


def _probabilities_and_cams(predictor: Predictor, model: keras.Model, images: np.ndarray, class_index: int,
                            batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
    """The engine's probabilities of ``images`` and the Grad-CAM of ``class_index`` from its own maps (at
    the maps' resolution; None where the engine gives no maps), batch by batch: maps of a whole test
    split would hold 400 KB an image at 224 px."""
    probabilities, cams = [], []
    for start in range(0, len(images), batch_size):
        probability, maps = predictor.predict_with_maps(images[start : start + batch_size], batch_size)
        probabilities.append(probability)
        cams.append(None if maps is None else cams_from_maps(model, maps, class_index)[0])
    if any(cam is None for cam in cams):
        return np.concatenate(probabilities), None
    return np.concatenate(probabilities), np.concatenate(cams)


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
