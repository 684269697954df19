"""Prefect tasks that turn a fitted, scored model into a registered version: card, plots, bundle,
promotion, and the training artifacts in the Prefect UI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from model.acceptance import Acceptance
from model.bundle import ModelCard, file_digests, model_to_bytes, software_versions
from model.drift_tests import DRIFT_REFERENCE_FILE, Profile
from model.plots import confusion_png, curves_png, roc_png
from model.preprocessing import Preprocessing
from model.scope import SCOPE_FILE
from model.training import TrainingConfig
from store import engines, registry
from store.clock import utc_timestamp
from store.datasets import Dataset, fingerprint
from tasks.clinical import Audit, Calibration
from tasks.promotion import Promotion
from tasks.retrying import io_step
from tasks.scope_fitting import ScopeFit
from tasks.train_data import LabelledArrays, TrainingSplit
from tasks.train_fit import FitResult
from tasks.train_scoring import EngineReport, Evaluation
from templates import render

__all__ = ["TrainedModel", "TrainingRun", "card_markdown", "make_bundle", "publish_bundle", "report_training",
           "unsigned_banner"]


@dataclass(frozen=True)
class TrainedModel:
    """What the train flow returns: the new version, where it is, and whether it became production."""

    card: ModelCard
    bundle_uri: str
    promoted: bool
    reason: str
    unsigned_warning: str | None = None  # registry.unsigned_warning of its store: None when signed

    @property
    def version(self) -> str:
        return self.card.version


def card_markdown(card: ModelCard) -> str:
    """The human-readable model card: intended use, data, subgroup tables, calibration, limitations."""
    return render("card.md.j2",
        card=card, validity=card.validity, overall=card.validity.get("overall", {}), calibration=card.calibration,
        promotion=card.promotion)


@dataclass(frozen=True)
class TrainingRun:
    """What a training run was given and how it split its data: what its card records of them."""

    dataset: Dataset
    loaded: LabelledArrays
    split: TrainingSplit
    spec: Preprocessing
    config: TrainingConfig
    weights: dict  # origin and sha256 of the base weights
    test_fraction: float
    acceptance: Acceptance
    synthetic: dict | None = None  # what synthetic images joined the training part (tasks/synthetic_training.py)


@task(cache_policy=NO_CACHE)
def make_bundle(run: TrainingRun, fitted: FitResult, evaluation: Evaluation, calibration: Calibration, audit: Audit,
                promotion: Promotion, scope: ScopeFit | None = None, drift_reference: Profile | None = None
                ) -> tuple[ModelCard, dict[str, bytes]]:
    """The card and every other file of the bundle, as bytes; the card lists their sha256."""
    model, history, metrics, split, loaded = fitted.model, fitted.history, evaluation.metrics, run.split, run.loaded
    model_bytes = model_to_bytes(model)
    card = ModelCard(
        version=registry.new_version(), classes=split.classes, positive_class=split.positive,
        threshold=evaluation.threshold, preprocessing=run.spec.to_dict(), weights=run.weights,
        dataset={"uri": run.dataset.uri, "source": run.dataset.source, "fingerprint": fingerprint(loaded.items),
                 "images": len(loaded.items), "rejected": [list(r) for r in loaded.rejected],
                 "split_seed": run.config.seed, "test_fraction": run.test_fraction, "train_images": int(len(split.train)),
                 "validation_images": int(len(split.validation)), "test_images": int(len(split.test)),
                 "test_fingerprint": fingerprint([loaded.items[i] for i in split.test]),
                 "validation_fingerprint": fingerprint([loaded.items[i] for i in split.validation]),
                 "class_counts": run.dataset.class_counts, **({"synthetic": run.synthetic} if run.synthetic else {})},
        metrics=metrics, training={**run.config.to_dict(), "balance_strata": split.balance,
                                   "selected_l2": history["stage1"].get("selected_l2", [None])[0],
                                   "leave_out": "=".join(split.leave_out) if split.leave_out else None,
                                   **({"strata_dropped": list(split.strata_dropped)} if split.strata_dropped else {}),
                                   "features_engine": fitted.features_engine or {},
                                   "head_selection": fitted.selection, "acceptance": run.acceptance.to_dict()},
        software=software_versions(), validity=audit.validity, calibration=calibration.record,
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        created_at=utc_timestamp(), promotion=promotion.card_record(), scope=scope.record if scope else {},
    )
    figures = {"calibration.png": calibration.figure, "gradcam.png": audit.mean_cam}
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
        **({SCOPE_FILE: scope.model.to_bytes()} if scope and scope.model else {}),
        **({DRIFT_REFERENCE_FILE: json.dumps(drift_reference.to_dict()).encode()} if drift_reference else {}),
    }
    card.files = file_digests(files)  # card.json vouches for every other file (store/registry.py)
    return card, files


@task(**io_step(retries=3, retry_delay_seconds=5))
def publish_bundle(store_uri: str, files: dict[str, bytes], card: ModelCard, engine_report: EngineReport | None = None
                   ) -> str:
    """The bundle, then its engines beside it (until they land, the version is served by fp32)."""
    folder = registry.publish(store_uri, card.version, files, card)
    if engine_report is not None and engine_report.checks:
        engines.record_checks(store_uri, card, engine_report.checks, engine_report.files)
    return folder


@task
def report_training(trained: TrainedModel) -> None:
    """Log line, markdown summary and per-class table in the Prefect UI."""
    card, bundle_uri = trained.card, trained.bundle_uri
    logger = get_run_logger()
    logger.info("Model %s written to %s; %s: %s", card.version, bundle_uri,
                "promoted" if trained.promoted else "not promoted", trained.reason)
    banner = unsigned_banner(trained.unsigned_warning)
    if trained.unsigned_warning:
        logger.warning("%s", trained.unsigned_warning)
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
                             markdown=banner + render("training.md.j2", card=card, trained=trained,
                                                      bundle_uri=bundle_uri, metrics=metrics, positive=positive))
    create_markdown_artifact(key="model-card", description=f"Model card of {card.version}: subgroups, intervals, "
                                                           "calibration, limitations",
                             markdown=banner + card_markdown(card))


def unsigned_banner(warning: str | None) -> str:
    """The markdown that opens an artifact of an unsigned store: the warning, first and loud."""
    if not warning:
        return ""
    # The store's URI is text, not markup: character references for what would start markup.
    text = "".join(f"&#{ord(char)};" if char in "`[]<>|*_\\" else " " if char in "\r\n" else char for char in warning)
    return f"> **WARNING: {text}**\n\n"
