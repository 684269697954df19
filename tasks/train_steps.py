"""Prefect tasks of the training flow: data in, model fitted and scored, bundle out."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from model.bundle import BundleError
from model.evaluation import evaluate
from model.network import IMAGENET_FILE
from model.preprocessing import Preprocessing
from model.training import predict_probabilities
from tasks import registry, storage
from tasks.datasets import Dataset, LabelledImage, discover_dataset
from tasks.loading import load_images

__all__ = ["LabelledArrays", "EpochReporter", "discover", "load_labelled", "resolve_weights", "score_production"]


@dataclass(frozen=True)
class LabelledArrays:
    items: tuple[LabelledImage, ...]  # with sha256, in the order of ``images``
    images: np.ndarray  # resized uint8
    rejected: tuple[tuple[str, str], ...]  # (uri, reason)


@task(retries=2, retry_delay_seconds=5)
def discover(dataset_uri: str) -> Dataset:
    dataset = discover_dataset(dataset_uri)
    logger = get_run_logger()
    logger.info("Found %d labelled images in %s (%s): %s", len(dataset.items), dataset_uri, dataset.source,
                ", ".join(f"{k} {v}" for k, v in dataset.class_counts.items()))
    if dataset.ignored:
        logger.warning("Ignored %d file(s) that are not labelled images, e.g. %s", len(dataset.ignored), dataset.ignored[0])
    return dataset


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
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
        kept.append(LabelledImage(item.uri, item.label, item.patient_id, image.sha256))
        images.append(image.pixels)
    if not images:
        raise ValueError("no usable images: every file was rejected (see the warnings above)")
    logger.info("Loaded %d images at %dx%d (%d rejected)", len(images), spec.input_size, spec.input_size, len(rejected))
    return LabelledArrays(tuple(kept), np.stack(images), tuple(rejected))


@task(retries=2, retry_delay_seconds=5)
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
def score_production(store_uri: str, classes: list[str], test_labels: np.ndarray,
                     load_test_images: Callable[[Preprocessing], np.ndarray], positive: str) -> dict | None:
    """The production model's positive-class metrics on this test split, or None if not comparable."""
    logger = get_run_logger()
    if registry.production_version(store_uri) is None:
        return None
    try:
        model, card = registry.load_model(store_uri)
    except (BundleError, storage.StorageError, ValueError) as error:
        logger.warning("Production model could not be loaded, so it is not compared: %s", error)
        return None
    if card.classes != classes:
        logger.warning("Production model %s has classes %s, the new one %s: not comparable", card.version,
                       card.classes, classes)
        return None
    spec = card.spec()
    images = load_test_images(spec)
    probabilities = predict_probabilities(model, images, spec)
    metrics = evaluate(test_labels, probabilities, classes, positive, card.threshold)["positive"]
    logger.info("Production model %s on this test split: AUC %s, sensitivity %.3f at its threshold",
                card.version, metrics["auc"], metrics["sensitivity_at_threshold"])
    return {**metrics, "version": card.version}


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

