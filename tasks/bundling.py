"""Prefect tasks that turn a fitted, scored model into a registered version: card, plots, bundle,
promotion, and the training artifacts in the Prefect UI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import keras
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from model.acceptance import Acceptance
from model.bundle import ModelCard, file_digests, model_to_bytes, software_versions
from model.inference import EngineCheck
from model.plots import confusion_png, curves_png, roc_png
from model.preprocessing import Preprocessing
from model.training import TrainingConfig
from store import engines, registry
from store.datasets import Dataset, fingerprint
from tasks.retrying import io_step
from tasks.train_steps import LabelledArrays, TrainingSplit
from templates import render

__all__ = ["TrainedModel", "card_markdown", "make_bundle", "promote", "publish_bundle",
           "read_production", "report_training"]


@dataclass(frozen=True)
class TrainedModel:
    """What the train flow returns: the new version, where it is, and whether it became production."""

    card: ModelCard
    bundle_uri: str
    promoted: bool
    reason: str

    @property
    def version(self) -> str:
        return self.card.version


def card_markdown(card: ModelCard) -> str:
    """The human-readable model card: intended use, data, subgroup tables, calibration, limitations."""
    return render("card.md.j2",
        card=card, validity=card.validity, overall=card.validity.get("overall", {}), calibration=card.calibration,
        promotion=card.promotion)


@task(cache_policy=NO_CACHE)
def make_bundle(model: keras.Model, history: dict, threshold: float, metrics: dict, *, dataset: Dataset,
                loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing, config: TrainingConfig,
                weights: dict, test_fraction: float, promotion: dict, validity: dict, calibration: dict,
                figures: dict[str, bytes | None], features_engine: dict | None = None,
                synthetic: dict | None = None, selection: dict | None = None,
                acceptance: Acceptance | None = None) -> tuple[ModelCard, dict[str, bytes]]:
    """The card and every other file of the bundle, as bytes; the card lists their sha256.
    ``synthetic``: what synthetic images joined the training part (tasks/synthetic_training.py)."""
    model_bytes = model_to_bytes(model)
    card = ModelCard(
        version=registry.new_version(), classes=split.classes, positive_class=split.positive, threshold=threshold,
        preprocessing=spec.to_dict(), weights=weights,
        dataset={"uri": dataset.uri, "source": dataset.source, "fingerprint": fingerprint(loaded.items),
                 "images": len(loaded.items), "rejected": [list(r) for r in loaded.rejected],
                 "split_seed": config.seed, "test_fraction": test_fraction, "train_images": int(len(split.train)),
                 "validation_images": int(len(split.validation)), "test_images": int(len(split.test)),
                 "test_fingerprint": fingerprint([loaded.items[i] for i in split.test]),
                 "validation_fingerprint": fingerprint([loaded.items[i] for i in split.validation]),
                 "class_counts": dataset.class_counts, **({"synthetic": synthetic} if synthetic else {})},
        metrics=metrics, training={**config.to_dict(), "balance_strata": split.balance,
                                   "selected_l2": history["stage1"].get("selected_l2", [None])[0],
                                   "leave_out": "=".join(split.leave_out) if split.leave_out else None,
                                   "features_engine": features_engine or {},
                                   "head_selection": selection, "acceptance": (acceptance or Acceptance()).to_dict()},
        software=software_versions(), validity=validity, calibration=calibration,
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), promotion=promotion,
    )
    positive = metrics["positive"]
    files = {
        "model.keras": model_bytes,
        "history.json": json.dumps(history, indent=2).encode(),
        "curves.png": curves_png(history),
        "confusion.png": confusion_png(metrics["confusion_matrix"], split.classes),
        "roc.png": roc_png(positive["roc"]["fpr"], positive["roc"]["tpr"], positive["auc"], split.positive,
                           (positive["sensitivity_at_threshold"], positive["specificity_at_threshold"])),
        **{name: figure for name, figure in figures.items() if figure is not None},
        "card.md": card_markdown(card).encode(),
    }
    card.files = file_digests(files)  # card.json vouches for every other file (store/registry.py)
    return card, files


@task(**io_step(retries=3, retry_delay_seconds=5))
def publish_bundle(store_uri: str, files: dict[str, bytes], card: ModelCard,
                   engine_checks: Sequence[EngineCheck] = (), engine_files: dict[str, bytes] | None = None) -> str:
    """The bundle, then its engines beside it (until they land, the version is served by fp32)."""
    folder = registry.publish(store_uri, card.version, files, card)
    if engine_checks:
        engines.record_checks(store_uri, card, engine_checks, engine_files)
    return folder


@task(cache_policy=NO_CACHE, **io_step())
def read_production(store_uri: str) -> registry.Production:
    """production.json as training finds it before comparing: promotion is written against it."""
    return registry.read_production(store_uri)


@task(cache_policy=NO_CACHE, **io_step(retries=3, retry_delay_seconds=5))
def promote(store_uri: str, version: str, reason: str, seen: registry.Production | None = None,
            by: str | None = None) -> tuple[bool, str]:
    """Make the new version production, unless production changed since ``seen`` was read (another
    training or an operator won): then it stays a candidate, and the reason returned says why."""
    try:
        registry.set_production(store_uri, version, reason, by=by, expected=seen)
    except registry.PromotionConflict as error:
        get_run_logger().warning("Model %s left as a candidate: %s", version, error)
        return False, f"left as a candidate: {error}"
    return True, reason


@task
def report_training(trained: TrainedModel) -> None:
    """Log line, markdown summary and per-class table in the Prefect UI."""
    card, bundle_uri = trained.card, trained.bundle_uri
    get_run_logger().info("Model %s written to %s; %s: %s", card.version, bundle_uri,
                          "promoted" if trained.promoted else "not promoted", trained.reason)
    metrics, positive = card.metrics, card.metrics["positive"]
    rows = []
    for name in card.classes:
        report = metrics["classification_report"][name]
        extra = metrics["per_class"][name]
        rows.append({"class": name, "precision": round(report["precision"], 4), "recall": round(report["recall"], 4),
                     "f1": round(report["f1-score"], 4), "support": int(report["support"]),
                     "sensitivity": extra["sensitivity"], "specificity": extra["specificity"], "auc": extra["auc"]})
    create_table_artifact(rows, key="training-metrics", description=f"Test-split metrics of model {card.version}")
    create_markdown_artifact(key="training-summary", description=f"Model {card.version}",
                             markdown=render("training.md.j2", card=card, trained=trained, bundle_uri=bundle_uri,
                                             metrics=metrics, positive=positive))
    create_markdown_artifact(key="model-card", description=f"Model card of {card.version}: subgroups, intervals, "
                                                           "calibration, limitations", markdown=card_markdown(card))
