"""Prefect tasks of site validation: the stored version, which of the site's images to score, the
figures, and the evaluation kept beside the version (and under ``--output``)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import keras
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from model import stored_json
from model.acceptance import Acceptance, judge
from model.anatomy import mask_images
from model.bundle import BundleError, ModelCard, software_versions
from model.defaults import MAX_STRATA
from model.evaluation import auc
from model.plots import reliability_png
from model.site_evaluation import compare_with_card, site_figures
from model.strata import capped
from model.training import predict_probabilities
from model.validity import default_strata
from store import evaluations, registry, storage
from store.datasets import (
    DatasetError,
    LabelledImage,
    fingerprint,
    metadata_columns,
    training_parts,
)
from tasks.retrying import io_step
from tasks.train_data import LabelledArrays
from templates import render

__all__ = ["Selection", "criteria_for", "load_version", "measure", "publish_evaluation", "select_images"]


@task(**io_step(), cache_policy=NO_CACHE)
def load_version(model_store_uri: str, model_version: str) -> tuple[keras.Model, ModelCard, str]:
    """The model, its card (signature, schema, sha256 checked) and the sha256 of its card.json."""
    model, card = registry.load_model(model_store_uri, model_version)
    return model, card, evaluations.card_sha256(model_store_uri, card.version)


def criteria_for(card: ModelCard, min_auc: float | None, min_specificity: float | None,
                 bound: str | None) -> Acceptance:
    """The options given, else the card's own acceptance record (training's criteria), else the
    defaults; the sensitivity promise is the one the card's threshold was chosen for."""
    recorded = card.training.get("acceptance")
    try:
        base = Acceptance.from_dict(recorded) if isinstance(recorded, dict) else Acceptance()
    except (TypeError, ValueError) as error:
        raise BundleError(f"model {card.version}: its card's acceptance criteria are not valid ({error})") from None
    target = card.metrics.get("validation", {}).get("target_sensitivity") if isinstance(
        card.metrics.get("validation"), dict) else None
    values = {**base.to_dict(), **{name: value for name, value in (
        ("min_auc", min_auc), ("min_specificity", min_specificity), ("bound", bound)) if value is not None}}
    if isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target <= 1:
        values["target_sensitivity"] = float(target)
    return Acceptance.from_dict(values)


@dataclass(frozen=True)
class Selection:
    """The rows of the loaded images to score, with what the reader must know about the choice."""

    rows: np.ndarray
    notes: list[str]
    held_out_only: bool
    where: list[str]


@task(cache_policy=NO_CACHE)
def select_images(loaded: LabelledArrays, card: ModelCard, dataset_uri: str, where: list[str]) -> Selection:
    """Every loaded image, but: of the model's own training dataset (same fingerprint) only the
    images it never learned from (its test split, and a level it left out), and only those with
    the ``where`` levels (COL=LEVEL; several levels of one column: any of them)."""
    logger = get_run_logger()
    rows, notes, held_out_only = np.arange(len(loaded.items)), [], False
    if fingerprint(loaded.items) == card.dataset.get("fingerprint"):
        rows, held_out_only = _held_out(loaded.items, card), True
        notes.append(f"this is the dataset model {card.version} was trained on: only its {len(rows)} held-out "
                     "images (its test split, and any level it left out) are scored, which is no site's data")
    elif storage.join(dataset_uri) == storage.join(str(card.dataset.get("uri", ""))):
        notes.append("this dataset lies where the model's training data lay but holds other images now: the model "
                     "may have trained on some of them, and its figures here may be too good")
    wanted: dict[str, set[str]] = {}
    for condition in where:
        column, _, level = condition.partition("=")
        wanted.setdefault(column.strip(), set()).add(level.strip())
    columns = metadata_columns(loaded.items)
    for column, levels in wanted.items():
        if column not in columns:
            raise DatasetError(f"{dataset_uri}: no manifest column {column!r} for --where "
                               f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
        unknown = levels - set(columns[column])
        if unknown:
            raise DatasetError(f"{dataset_uri}: {column} has no level {', '.join(map(repr, sorted(unknown)))} "
                               f"(levels: {', '.join(sorted(set(columns[column])))})")
        rows = np.array([row for row in rows if columns[column][row] in levels], dtype=int)
    if not len(rows):
        raise DatasetError(f"{dataset_uri}: no image left to score with {', '.join(where)}")
    logger.info("Scoring %d of %d images%s", len(rows), len(loaded.items), f" ({'; '.join(notes)})" if notes else "")
    return Selection(rows, notes, held_out_only, list(where))


def _held_out(items: tuple[LabelledImage, ...], card: ModelCard) -> np.ndarray:
    """The rows training never learned from, its split rebuilt from the card as validate-engines does."""
    try:
        parts = training_parts(items, card.dataset["test_fraction"], card.dataset["split_seed"],
                               card.training.get("leave_out"))
    except (KeyError, TypeError) as error:
        raise BundleError(f"model {card.version}: its card does not say how its data was split ({error})") from None
    if fingerprint(parts.test) != card.dataset.get("test_fingerprint"):
        raise DatasetError(f"model {card.version}: its test split cannot be rebuilt from these images, so which of "
                           "them it trained on is unknown: evaluate it on other data")
    held = {item.uri for item in parts.test} | {item.uri for item in parts.left_out}
    return np.array([row for row, item in enumerate(items) if item.uri in held], dtype=int)


def _class_indices(labels: list[str], card: ModelCard) -> np.ndarray:
    """Site labels as the model's class indices: binary models call every other label
    'non-<positive>'; a multiclass model knows only its own classes."""
    binary = card.classes == [f"non-{card.positive_class}", card.positive_class]
    indices = []
    for label in labels:
        if label in card.classes:
            indices.append(card.classes.index(label))
        elif binary:
            indices.append(0)
        else:
            raise DatasetError(f"label {label!r} is not one of model {card.version}'s classes "
                               f"({', '.join(card.classes)})")
    return np.array(indices, dtype=int)


@task(cache_policy=NO_CACHE)
def measure(model: keras.Model, card: ModelCard, loaded: LabelledArrays, selection: Selection,
            strata: list[str] | None, criteria: Acceptance, n_resamples: int, seed: int) -> tuple[dict, bytes]:
    """The figures of the selected images (the training audit's, at the card's threshold), the
    comparison with the card and the verdict; and the reliability diagram."""
    logger = get_run_logger()
    spec, rows = card.spec(), selection.rows
    items = [loaded.items[row] for row in rows]
    columns = {name: [values[row] for row in rows] for name, values in metadata_columns(loaded.items).items()}
    chosen, dropped = capped(default_strata(columns) if strata is None else list(strata), MAX_STRATA,
                             named=strata is not None)
    if dropped:  # each stratum is bootstrapped: thousands of manifest columns would cost hours
        logger.warning("%d manifest columns are not evaluated within (at most %d are): %s", len(dropped), MAX_STRATA,
                       ", ".join(dropped[:50]) + (f" and {len(dropped) - 50} more" if len(dropped) > 50 else ""))
    for name in chosen:
        if name not in columns:
            raise DatasetError(f"no manifest column {name!r} to stratify by "
                               f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    labels = _class_indices([item.label for item in items], card)
    probabilities = predict_probabilities(model, loaded.images[rows], spec)
    positive = card.classes.index(card.positive_class)
    figures = site_figures(labels, probabilities, card.classes, card.positive_class, card.threshold,
                           {name: columns[name] for name in chosen}, [item.patient_id or item.uri for item in items],
                           n_resamples=n_resamples, seed=seed)
    is_positive, scores = labels == positive, probabilities[:, positive]
    figures["masked"] = _masked(model, loaded.images[rows], spec, positive, is_positive)
    blanked = figures["masked"]["auc_lungs_blanked"]
    if blanked is not None and blanked >= 0.75:
        figures["warnings"].append(f"with the lung fields blanked the site AUC is still {blanked:.2f}: the model "
                                   "reads something outside the lungs")
    if not 0 < is_positive.sum() < len(is_positive):
        figures["warnings"].append(f"the images scored hold {'no' if not is_positive.any() else 'only'} "
                                   f"{card.positive_class} images: AUC and one of sensitivity and specificity cannot "
                                   "be measured, so the model cannot be shown fit on them")
    figures["comparison"] = compare_with_card(figures, card.validity, card.metrics, card.calibration)
    figures["verdict"] = judge(figures["overall"], criteria).to_dict()
    logger.info("Site figures: AUC %s, sensitivity %s, specificity %s at threshold %.4f; %s",
                figures["overall"]["auc"], figures["overall"]["sensitivity"], figures["overall"]["specificity"],
                card.threshold, figures["verdict"]["line"])
    for line in figures["warnings"]:
        logger.warning("Warning: %s", line)
    figures["labels"] = {label: sum(item.label == label for item in items)
                         for label in sorted({item.label for item in items})}
    figures["fingerprint"] = fingerprint(items)
    return figures, reliability_png(is_positive, scores, names=("site images", ""))


def _masked(model: keras.Model, images: np.ndarray, spec, positive: int, is_positive: np.ndarray) -> dict:
    """AUC with the lung fields blanked, and with all but them blanked (one grey: the images' mean)."""
    fill = int(round(float(images.mean())))
    found = {"method": f"fixed anatomical prior (model/anatomy.py), blanked with the images' mean grey ({fill})"}
    for keep, name in (("outside", "auc_lungs_blanked"), ("lungs", "auc_only_lungs")):
        scores = predict_probabilities(model, mask_images(images, keep=keep, fill=fill), spec)[:, positive]
        found[name] = auc(is_positive, scores)
    return found


def evaluation_record(evaluation_id: str, card: ModelCard, card_digest: str, dataset_uri: str,
                      loaded: LabelledArrays, selection: Selection, figures: dict, n_resamples: int,
                      created_at: str) -> dict:
    """evaluation.json's content (the registry adds the other files' sha256)."""
    try:
        ours = package_version("cxr-screen")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "evaluation_id": evaluation_id, "model_version": card.version, "model_card_sha256": card_digest,
        "model_sha256": card.model_sha256, "created_at": created_at,
        "dataset": {"uri": dataset_uri, "fingerprint": figures["fingerprint"], "images_found": len(loaded.items),
                    "where": selection.where, "held_out_only": selection.held_out_only, "labels": figures["labels"]},
        "images": int(len(selection.rows)),
        "rejected": [{"uri": uri, "reason": reason} for uri, reason in loaded.rejected],
        "classes": list(card.classes), "positive_class": card.positive_class, "threshold": float(card.threshold),
        "bootstrap": n_resamples,
        **{name: figures[name] for name in ("overall", "strata", "operating_point", "metrics", "calibration",
                                            "masked", "comparison", "verdict")},
        "warnings": [*selection.notes, *figures["warnings"]],
        "software": {**software_versions(), "cxr-screen": ours},
    }


@task(**io_step(retry_delay_seconds=5))
def publish_evaluation(model_store_uri: str, card: ModelCard, record: dict, reliability: bytes,
                       output_uri: str | None) -> tuple[dict, dict[str, str]]:
    """The evaluation beside the version (evaluation.json last), then the same three files under
    ``output_uri``; a Prefect artifact with the report. Returns evaluation.json's content as
    written, and where each went."""
    markdown = render("evaluation.md.j2", e=record)
    files = {"evaluation.md": markdown.encode(), "reliability.png": reliability}
    folder = evaluations.write_evaluation(model_store_uri, card, record, files)
    outputs = {"evaluation": storage.join(folder, evaluations.EVALUATION)}
    stored = storage.read_bytes(outputs["evaluation"])
    if output_uri:
        for name, content in {evaluations.EVALUATION: stored, **files}.items():
            storage.write_bytes(storage.join(output_uri, name), content)
        outputs["output"] = storage.join(output_uri)
    create_markdown_artifact(key="site-evaluation", description=f"Site evaluation of model {card.version}",
                             markdown=markdown + f"\nKept at `{folder}`\n")
    get_run_logger().info("Evaluation %s of %s written to %s: %s", record["evaluation_id"], card.version, folder,
                          record["verdict"]["line"])
    return stored_json.loads(stored, outputs["evaluation"]), outputs
