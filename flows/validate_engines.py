"""Check the reduced-precision engines of an existing model version, as training does for a new one.

Reads the version's dataset again, rebuilds its test split from the card (seed, fraction, level
left out) with training's own split rule (store.datasets.training_parts) and goes on only if that split has the fingerprint the card recorded: an engine is only
ever held to the test images the version was evaluated on. int8 is quantised on images of the
same training part. The checks and engine files are written beside the bundle.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from model.bundle import BundleError
from model.inference import EngineCheck
from model.training import predict_probabilities
from store import engines, registry
from store.datasets import fingerprint, training_parts
from tasks.train_steps import calibration_sample, check_engines, discover, load_labelled


@flow(name="validate-engines", description="Check every engine against fp32 on a model version's test split.")
def validate_engines(model_store_uri: str, model_version: str = "production",
                     dataset_uri: str | None = None) -> list[EngineCheck]:
    """Returns the checks; ``dataset_uri`` overrides the card's (the same images, moved)."""
    model, card = registry.load_model(model_store_uri, model_version)
    spec, seed = card.spec(), card.dataset["split_seed"]
    dataset = discover(dataset_uri or card.dataset["uri"])
    loaded = load_labelled(dataset.items, spec)
    parts = training_parts(loaded.items, card.dataset["test_fraction"], seed, card.training.get("leave_out"))
    if fingerprint(parts.test) != card.dataset.get("test_fingerprint"):
        raise BundleError(f"model {card.version}: the test split rebuilt from {dataset.uri} is not the one its card "
                          "recorded (the dataset changed since training): its engines cannot be checked on it")
    position = {item.uri: index for index, item in enumerate(loaded.items)}
    test = np.array([position[item.uri] for item in parts.test], dtype=int)
    train = np.array([position[item.uri] for item in parts.train], dtype=int)
    labels = np.array([_class_index(item.label, card.classes, card.positive_class) for item in parts.test])

    checks, files = check_engines(model, spec, card.threshold, card.classes.index(card.positive_class),
                                  loaded.images[test], labels, predict_probabilities(model, loaded.images[test], spec),
                                  loaded.images[calibration_sample(train, seed)], [item.uri for item in parts.test])
    uri = engines.record_checks(model_store_uri, card, checks, files)
    allowed, notes = engines.validated_engines(model_store_uri, card)
    get_run_logger().info("Engine checks of %s written to %s; may serve it: %s%s", card.version, uri,
                          ", ".join(allowed), f" ({notes})" if notes else "")
    return checks


def _class_index(label: str, classes: list[str], positive: str) -> int:
    """Binary models call every other class 'non-<positive>'; multiclass ones name each class."""
    label = label.strip().lower()
    if label in classes:
        return classes.index(label)
    return next(index for index, name in enumerate(classes) if name != positive)
