"""Check the reduced-precision engines of an existing model version, as training does for a new one.

Reads the version's dataset again and rebuilds its split from the card (positive class, classes,
seed, fraction, level left out) with training's own split step (tasks.train_data.build_split), and
goes on only if the test part has the fingerprint the card recorded: an engine is only ever held
to the test images the version was evaluated on. int8 is quantised on images of the same training
part. The checks and engine files are written beside the bundle.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from model.bundle import BundleError
from model.inference import EngineCheck
from store import engines, registry
from store.datasets import fingerprint
from tasks.train_data import build_split, discover, load_labelled
from tasks.train_scoring import check_engines


@flow(name="validate-engines", description="Check every engine against fp32 on a model version's test split.")
def validate_engines(model_store_uri: str, model_version: str = "production",
                     dataset_uri: str | None = None) -> list[EngineCheck]:
    """Returns the checks; ``dataset_uri`` overrides the card's (the same images, moved)."""
    model, card = registry.load_model(model_store_uri, model_version)
    spec = card.spec()
    dataset = discover(dataset_uri or card.dataset["uri"])
    loaded = load_labelled(dataset.items, spec)
    # Binary models name the other class 'non-<positive>'; multiclass ones name each class.
    multiclass = card.classes != [f"non-{card.positive_class}", card.positive_class]
    changed = BundleError(f"model {card.version}: the test split rebuilt from {dataset.uri} is not the one its card "
                          "recorded (the dataset changed since training): its engines cannot be checked on it")
    try:
        split = build_split(loaded, card.positive_class, multiclass, card.dataset["test_fraction"],
                            card.dataset["split_seed"], strata=[], leave_out=card.training.get("leave_out"),
                            logger=get_run_logger())
    except ValueError as error:  # a class or the left-out level is gone: not the dataset it was trained on
        raise changed from error
    if split.classes != card.classes or fingerprint([loaded.items[i] for i in split.test]) != card.dataset.get(
            "test_fingerprint"):
        raise changed
    report = check_engines(model, spec, loaded, split, card.threshold, card.dataset["split_seed"])
    uri = engines.record_checks(model_store_uri, card, report.checks, report.files)
    allowed, notes = engines.validated_engines(model_store_uri, card)
    get_run_logger().info("Engine checks of %s written to %s; may serve it: %s%s", card.version, uri,
                          ", ".join(allowed), f" ({notes})" if notes else "")
    return report.checks
