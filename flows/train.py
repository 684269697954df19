"""On-demand retraining: VGG16 transfer learning, evaluation on a patient-held-out split, registry.

Reads top to bottom as the steps: find the data, load it, split it, fit, choose the threshold on
validation, score on test, write the bundle, promote if it beats production on the same split.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

import keras
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from model.augmentation import Augmentation
from model.bundle import ModelCard, model_to_bytes, software_versions
from model.evaluation import choose_threshold, evaluate
from model.network import build_classifier
from model.plots import confusion_png, curves_png, roc_png
from model.preprocessing import Preprocessing
from model.training import TrainingConfig, TrainingData, fine_tune, fit_head_cached, predict_probabilities
from tasks import registry
from tasks.datasets import LabelledImage, find_duplicates, fingerprint, split_dataset
from tasks.loading import load_images
from tasks.train_steps import EpochReporter, discover, load_labelled, resolve_weights, score_production


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


@task(cache_policy=NO_CACHE)
def fit_model(data: TrainingData, spec: Preprocessing, config: TrainingConfig, weights: str | None) -> tuple[keras.Model, dict]:
    """Stage 1 on cached features, then stage 2 (block5) when fine-tune epochs are asked for."""
    logger = get_run_logger()
    keras.utils.set_random_seed(config.seed)
    _use_gpu_if_present()
    model = build_classifier(data.num_classes, spec.input_size, weights, seed=config.seed)
    total = config.epochs + config.fine_tune_epochs
    started = time.perf_counter()
    reporter = EpochReporter("stage 1 (head, cached features)", config.epochs, total)

    def on_features(draw: int, draws: int) -> None:
        logger.info("Computed base features of the training images: draw %d/%d (%.0f s)", draw, draws,
                    time.perf_counter() - started)

    history = {"stage1": fit_head_cached(model, data, spec, config, [reporter], on_features)}
    if config.fine_tune_epochs:
        tuner = EpochReporter("stage 2 (block5 fine-tuning)", config.fine_tune_epochs, total,
                              len(history["stage1"]["loss"]), reporter.artifact_id)
        history["stage2"] = fine_tune(model, data, spec, config, [tuner])
    logger.info("Training took %.0f s", time.perf_counter() - started)
    return model, {stage: {k: [float(v) for v in values] for k, values in h.items()} for stage, h in history.items()}


def _use_gpu_if_present() -> None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can only be set before first use
            pass


@task(retries=3, retry_delay_seconds=5)
def publish_bundle(store_uri: str, version: str, files: dict[str, bytes], card: ModelCard) -> str:
    return registry.publish(store_uri, version, files, card)


@task(retries=3, retry_delay_seconds=5)
def promote(store_uri: str, version: str, reason: str) -> None:
    registry.set_production(store_uri, version, reason)


@flow(name="train", description="Train a VGG16 transfer-learning classifier and register it.")
def train(
    dataset_uri: str,
    model_store_uri: str,
    positive: str = "covid",
    multiclass: bool = False,
    epochs: int = 25,
    fine_tune_epochs: int = 0,
    batch_size: int = 16,
    input_size: int = 224,
    weights: str = "imagenet",
    seed: int = 0,
    test_fraction: float = 0.2,
    target_sensitivity: float = 0.95,
    augment_draws: int = 3,
    horizontal_flip: bool = False,
    class_weights: bool = True,
    scale_mode: str = "unit",
    force_promote: bool = False,
) -> dict:
    """Returns the new version, whether it was promoted and why, and its test metrics."""
    logger = get_run_logger()
    spec = Preprocessing(input_size=input_size, scale_mode=scale_mode)
    config = TrainingConfig(epochs=epochs, fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, seed=seed,
                            augment_draws=augment_draws, class_weights=class_weights,
                            augmentation=Augmentation(horizontal_flip=horizontal_flip))
    positive = positive.strip().lower()
    weights_argument, weights_info = resolve_weights(weights)  # fail fast on a missing weights file

    dataset = discover(dataset_uri)
    loaded = load_labelled(dataset.items, spec)
    classes, labels = class_layout(loaded.items, positive, multiclass)

    split = split_dataset(loaded.items, test_fraction=test_fraction, seed=seed)
    for line in find_duplicates(loaded.items, split).lines():
        logger.warning("Duplicate: %s", line)
    # The threshold is chosen on a validation part of the training split, never on the test split.
    fit_part = split_dataset(split.train, test_fraction=0.2, seed=seed + 1)
    position = {item.uri: i for i, item in enumerate(loaded.items)}

    def rows(part) -> np.ndarray:
        return np.array([position[item.uri] for item in part], dtype=int)

    train_rows, val_rows, test_rows = rows(fit_part.train), rows(fit_part.test), rows(split.test)
    logger.info("Split by patient: %d train, %d validation, %d test images", len(train_rows), len(val_rows), len(test_rows))
    data = TrainingData(loaded.images[train_rows], labels[train_rows], loaded.images[val_rows], labels[val_rows],
                        len(classes))

    model, history = fit_model(data, spec, config, weights_argument)
    if weights_info["origin"] == "imagenet" and weights_info["sha256"] is None:
        weights_info = resolve_weights.fn("imagenet")[1]  # the download has happened by now

    positive_index = classes.index(positive)
    val_probabilities = predict_probabilities(model, data.x_val, spec)
    threshold = choose_threshold(data.y_val == positive_index, val_probabilities[:, positive_index], target_sensitivity)
    test_probabilities = predict_probabilities(model, loaded.images[test_rows], spec)
    metrics = evaluate(labels[test_rows], test_probabilities, classes, positive, threshold)
    metrics["validation"] = {"images": int(len(val_rows)), "target_sensitivity": target_sensitivity}
    logger.info("Test split: accuracy %.3f, %s AUC %s; threshold %.4f gives sensitivity %.3f, specificity %.3f",
                metrics["accuracy"], positive, _fmt(metrics["positive"]["auc"]), threshold,
                metrics["positive"]["sensitivity_at_threshold"], metrics["positive"]["specificity_at_threshold"])

    test_items = [loaded.items[i] for i in test_rows]

    def test_images_at(other: Preprocessing) -> np.ndarray:
        if other.input_size == spec.input_size:
            return loaded.images[test_rows]
        return np.stack([image.pixels for image in load_images([item.uri for item in test_items], other)])

    production = score_production(model_store_uri, classes, labels[test_rows], test_images_at, positive)
    promoted, reason = registry.promotion_decision(metrics["positive"], production, force_promote)

    version = registry.new_version()
    model_bytes = model_to_bytes(model)
    card = ModelCard(
        version=version, classes=classes, positive_class=positive, threshold=threshold,
        preprocessing=spec.to_dict(), weights=weights_info,
        dataset={"uri": dataset_uri, "source": dataset.source, "fingerprint": fingerprint(loaded.items),
                 "images": len(loaded.items), "rejected": [list(r) for r in loaded.rejected],
                 "split_seed": seed, "test_fraction": test_fraction, "train_images": int(len(train_rows)),
                 "validation_images": int(len(val_rows)), "test_images": int(len(test_rows)),
                 "test_fingerprint": fingerprint(test_items), "class_counts": dataset.class_counts},
        metrics=metrics, training=config.to_dict(), software=software_versions(),
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        promotion={"promoted": promoted, "reason": reason, "compared_with": production and production["version"]},
    )
    roc = metrics["positive"]["roc"]
    files = {
        "model.keras": model_bytes,
        "history.json": json.dumps(history, indent=2).encode(),
        "curves.png": curves_png(history),
        "confusion.png": confusion_png(metrics["confusion_matrix"], classes),
        "roc.png": roc_png(roc["fpr"], roc["tpr"], metrics["positive"]["auc"], positive,
                           (metrics["positive"]["sensitivity_at_threshold"], metrics["positive"]["specificity_at_threshold"])),
    }
    bundle_uri = publish_bundle(model_store_uri, version, files, card)
    if promoted:
        promote(model_store_uri, version, reason)
    logger.info("Model %s written to %s; %s: %s", version, bundle_uri, "promoted" if promoted else "not promoted", reason)
    _report(card, bundle_uri)
    return {"version": version, "bundle_uri": bundle_uri, "promoted": promoted, "reason": reason,
            "accuracy": metrics["accuracy"], "auc": metrics["positive"]["auc"], "threshold": threshold,
            "sensitivity": metrics["positive"]["sensitivity_at_threshold"],
            "specificity": metrics["positive"]["specificity_at_threshold"]}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _report(card: ModelCard, bundle_uri: str) -> None:
    """Markdown summary and per-class table in the Prefect UI."""
    metrics, positive = card.metrics, card.metrics["positive"]
    rows = []
    for name in card.classes:
        report = metrics["classification_report"][name]
        extra = metrics["per_class"][name]
        rows.append({"class": name, "precision": round(report["precision"], 4), "recall": round(report["recall"], 4),
                     "f1": round(report["f1-score"], 4), "support": int(report["support"]),
                     "sensitivity": extra["sensitivity"], "specificity": extra["specificity"], "auc": extra["auc"]})
    create_table_artifact(rows, key="training-metrics", description=f"Test-split metrics of model {card.version}")
    promotion = card.promotion
    create_markdown_artifact(key="training-summary", description=f"Model {card.version}", markdown=f"""
# Model {card.version}

**{'Promoted to production' if promotion['promoted'] else 'Not promoted'}**: {promotion['reason']}

| | |
|---|---|
| classes | {', '.join(card.classes)} |
| test images (patient-held-out) | {metrics['images']} |
| accuracy | {metrics['accuracy']:.4f} |
| {card.positive_class} AUC | {_fmt(positive['auc'])} |
| threshold (chosen on validation for sensitivity {metrics['validation']['target_sensitivity']}) | {card.threshold:.4f} |
| sensitivity / specificity at threshold (test) | {positive['sensitivity_at_threshold']:.3f} / {positive['specificity_at_threshold']:.3f} |
| weights | {card.weights['origin']} |
| data fingerprint | `{card.dataset['fingerprint'][:16]}` |

Plots: `{bundle_uri}/curves.png`, `{bundle_uri}/confusion.png`, `{bundle_uri}/roc.png`

High accuracy on public COVID-19 collections often reflects age and source (paediatric normals,
adult COVID images from publications) rather than disease: validate on local data before use.
""")
