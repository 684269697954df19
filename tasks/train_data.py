"""Prefect tasks of training's data: the dataset found and loaded, the base weights resolved, and
the split (patient-held-out test, validation, a level left out, strata and their weightings)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.defaults import MAX_STRATA
from model.linear_head import CrossValidation
from model.network import IMAGENET_FILE
from model.preprocessing import Preprocessing
from model.strata import capped, confounders, joint_levels
from model.training import (
    TrainingData,
)
from model.validity import (
    default_strata,
    mean_within_stratum_auc,
    stratum_sample_weights,
)
from store import storage
from store.datasets import (
    Dataset,
    DatasetError,
    LabelledImage,
    Split,
    discover_dataset,
    find_duplicates,
    metadata_columns,
    training_parts,
)
from store.loading import load_images
from tasks.retrying import io_step

__all__ = ["LabelledArrays", "TrainingSplit", "build_split", "class_layout", "discover", "imagenet_record", "load_labelled", "resolve_weights", "split_for_training"]

LOGGER = logging.getLogger(__name__)
MAX_NAMED_DROPPED = 50  # dropped stratum variables a log line names; the card names all


@dataclass(frozen=True)
class LabelledArrays:
    items: tuple[LabelledImage, ...]  # with sha256, in the order of ``images``
    images: np.ndarray  # resized uint8
    rejected: tuple[tuple[str, str], ...]  # (uri, reason)


@task(**io_step(retry_delay_seconds=5))
def discover(dataset_uri: str) -> Dataset:
    dataset = discover_dataset(dataset_uri)
    logger = get_run_logger()
    logger.info("Found %d labelled images in %s (%s): %s", len(dataset.items), dataset_uri, dataset.source,
                ", ".join(f"{k} {v}" for k, v in dataset.class_counts.items()))
    if dataset.ignored:
        logger.warning("Ignored %d file(s) that are not labelled images, e.g. %s", len(dataset.ignored), dataset.ignored[0])
    return dataset


# Reads and decodes every image of the dataset: a large one on S3 takes a while.
@task(**io_step(retry_delay_seconds=5, timeout_seconds=4 * 3600), cache_policy=NO_CACHE)
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
        kept.append(replace(item, sha256=image.sha256))
        images.append(image.pixels)
    if not images:
        raise ValueError("no usable images: every file was rejected (see the warnings above)")
    logger.info("Loaded %d images at %dx%d (%d rejected)", len(images), spec.input_size, spec.input_size, len(rejected))
    return LabelledArrays(tuple(kept), np.stack(images), tuple(rejected))


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


@dataclass(frozen=True)
class TrainingSplit:
    """Classes, labels and the row numbers (into ``LabelledArrays``) of each part of the split,
    with the metadata strata of every image and, when strata are balanced, per-image weights."""

    classes: list[str]
    positive: str
    labels: np.ndarray
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    strata: dict[str, list[str]] = field(default_factory=dict)  # variable -> level of every loaded image
    patients: list[str] = field(default_factory=list)
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # rows of the left-out level
    leave_out: tuple[str, str] | None = None
    # Weightings that balance classes inside strata, by name ('age_group', 'age_group+source', 'none');
    # training tries each and keeps the best on validation (``balanced_by`` then records it).
    balance_candidates: dict[str, np.ndarray | None] = field(default_factory=dict)
    balance: str | None = None  # the stratum variable(s, joined by '+') balanced by ``weights``
    weights: np.ndarray | None = None  # per loaded image; set on train and validation rows only
    # The same weightings as levels of every loaded image (None: class weights alone), from which
    # cross-validation computes each fold's weights on its own fitting images.
    balance_levels: dict[str, np.ndarray | None] = field(default_factory=lambda: {"none": None})
    mixed_only: bool = False
    # Stratum variables found but not evaluated within: beyond max_strata, by name.
    strata_dropped: tuple[str, ...] = ()

    @property
    def is_positive(self) -> np.ndarray:
        return self.labels == self.classes.index(self.positive)

    def levels(self, variable: str, rows: np.ndarray) -> list[str]:
        return [self.strata[variable][i] for i in rows]

    def mean_within_auc(self, rows: np.ndarray, scores: np.ndarray) -> float | None:
        """Mean within-stratum AUC of ``scores`` (of the images ``rows``) over the split's strata."""
        return mean_within_stratum_auc(self.is_positive[rows], scores, {name: self.levels(name, rows)
                                                                          for name in self.strata})

    def balanced_by(self, name: str) -> TrainingSplit:
        """This split with the weighting ``name`` (one of ``balance_candidates``) chosen."""
        weights = self.balance_candidates[name]
        return replace(self, balance=None if weights is None else name, weights=weights)

    def cross_validation(self, images: np.ndarray, pooled: bool, class_weights: bool = True) -> CrossValidation:
        """The training images for cross-validated choices: the training part, and with ``pooled``
        the validation part too (when nothing else needs validation, the choices, calibration and
        threshold get all of its images as out-of-fold predictions instead of one small split)."""
        rows = np.sort(np.concatenate([self.train, self.validation])) if pooled else self.train
        return CrossValidation(images[rows], self.labels[rows], np.array(self.patients, dtype=object)[rows],
                               {name: np.array(self.levels(name, rows)) for name in self.strata},
                               {name: None if levels is None else np.asarray(levels)[rows]
                                for name, levels in self.balance_levels.items()}, self.mixed_only, rows,
                               class_weights)

    def training_data(self, images: np.ndarray) -> TrainingData:
        """Training and validation arrays, every candidate weighting, and the validation images'
        strata, on whose within-stratum AUC training selects."""
        def part(weights, rows):
            return None if weights is None else weights[rows]

        return TrainingData(images[self.train], self.labels[self.train], images[self.validation],
                            self.labels[self.validation], len(self.classes),
                            part(self.weights, self.train), part(self.weights, self.validation),
                            val_strata={name: np.array(self.levels(name, self.validation)) for name in self.strata},
                            weightings=tuple((name, part(w, self.train), part(w, self.validation))
                                             for name, w in self.balance_candidates.items()
                                             if len(self.balance_candidates) > 1),
                            positive_index=self.classes.index(self.positive))


def _parse_leave_out(leave_out: str | None, columns: dict[str, list[str]]) -> tuple[str, str] | None:
    if not leave_out:
        return None
    variable, _, level = leave_out.partition("=")
    variable, level = variable.strip(), level.strip()
    if variable not in columns:
        raise DatasetError(f"--leave-out {leave_out}: no manifest column {variable!r} "
                           f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    if level not in set(columns[variable]):
        raise DatasetError(f"--leave-out {leave_out}: {variable} has no level {level!r} "
                           f"(levels: {', '.join(sorted(set(columns[variable])))})")
    return variable, level


@task(cache_policy=NO_CACHE)
def split_for_training(loaded: LabelledArrays, positive: str, multiclass: bool, test_fraction: float, seed: int,
                       strata: list[str] | None = None, balance_strata: str | None = None,
                       mixed_strata_only: bool = False, leave_out: str | None = None,
                       max_strata: int = MAX_STRATA) -> TrainingSplit:
    """Patient-held-out test split, then a validation part of the rest (the threshold is chosen on
    validation, never on test). ``leave_out`` ('COL=LEVEL') keeps a whole level out of all three,
    to measure how the model does on a source or site it never saw."""
    return build_split(loaded, positive, multiclass, test_fraction, seed, strata, balance_strata, mixed_strata_only,
                       leave_out, get_run_logger(), max_strata)


def build_split(loaded: LabelledArrays, positive: str, multiclass: bool, test_fraction: float, seed: int,
                strata: list[str] | None = None, balance_strata: str | None = None, mixed_strata_only: bool = False,
                leave_out: str | None = None, logger: logging.Logger | logging.LoggerAdapter = LOGGER,
                max_strata: int = MAX_STRATA) -> TrainingSplit:
    """``split_for_training``'s split, without Prefect (benches and notebooks call it). At most
    ``max_strata`` stratum variables: beyond it the default's are dropped by name, named ones refused."""
    classes, labels = class_layout(loaded.items, positive, multiclass)
    columns = metadata_columns(loaded.items)
    chosen = default_strata(columns) if strata is None else list(strata)
    balance_strata = None if balance_strata in (None, "", "none") else balance_strata
    if balance_strata not in (None, "auto"):
        try:
            joint_levels(columns, balance_strata)  # refuses an unknown column before any work
        except ValueError as error:
            raise DatasetError(str(error)) from None
    for name in chosen:
        if name not in columns:
            raise DatasetError(f"no manifest column {name!r} to stratify by "
                               f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    try:
        chosen, dropped = capped(chosen, max_strata, named=strata is not None)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    if dropped:
        shown = ", ".join(dropped[:MAX_NAMED_DROPPED]) + (f" and {len(dropped) - MAX_NAMED_DROPPED} more"
                                                          if len(dropped) > MAX_NAMED_DROPPED else "")
        logger.warning("%d manifest columns could stratify; the first %d are evaluated within (max_strata), %d "
                       "dropped: %s (the card names them all; name the ones that matter with strata)",
                       len(chosen) + len(dropped), len(chosen), len(dropped), shown)
    left_out = _parse_leave_out(leave_out, columns)
    parts = training_parts(loaded.items, test_fraction, seed, "=".join(left_out) if left_out else None)
    aside = {item.uri for item in parts.left_out}
    kept = [item for item in loaded.items if item.uri not in aside]
    for line in find_duplicates(kept, Split(parts.train + parts.validation, parts.test, seed, test_fraction)).lines():
        logger.warning("Duplicate: %s", line)
    position = {item.uri: i for i, item in enumerate(loaded.items)}

    def rows(part) -> np.ndarray:
        return np.array([position[item.uri] for item in part], dtype=int)

    train, validation = rows(parts.train), rows(parts.validation)
    is_positive = labels == classes.index(positive)
    if balance_strata == "auto":
        found = confounders(is_positive[train], {name: [columns[name][i] for i in train] for name in chosen})
        names = list(dict.fromkeys([*found.split("+"), found])) if found else []  # each, then jointly
    else:
        names = [balance_strata] if balance_strata else []
    candidates: dict[str, np.ndarray | None] = {}
    balance_levels: dict[str, np.ndarray | None] = {}
    for name in names:
        levels = np.array(joint_levels(columns, name))
        weights = np.zeros(len(labels))
        for part in (train, validation):
            weights[part] = stratum_sample_weights(labels[part], levels[part], len(classes), mixed_strata_only)
        candidates[name], balance_levels[name] = weights, levels
    if balance_strata == "auto" and candidates:
        candidates["none"] = None  # class weights only: it must beat the others to be kept
        logger.info("Balancing: each of %s is tried and the best kept", ", ".join(candidates))
    if not balance_levels or balance_strata == "auto":
        balance_levels["none"] = None
    held = rows(parts.left_out)
    result = TrainingSplit(classes, positive, labels, train, validation, rows(parts.test),
                           strata={name: columns[name] for name in chosen},
                           patients=[item.patient_id or item.uri for item in loaded.items],
                           held_out=held, leave_out=left_out, balance_candidates=candidates,
                           balance_levels=balance_levels, mixed_only=mixed_strata_only,
                           strata_dropped=tuple(dropped))
    if len(candidates) == 1:
        result = result.balanced_by(next(iter(candidates)))
    logger.info("Split by patient: %d train, %d validation, %d test images%s; strata: %s", len(train),
                len(validation), len(result.test),
                f", {len(held)} left out ({left_out[0]}={left_out[1]})" if left_out else "",
                ", ".join(chosen) or "none (no manifest columns)")
    return result


def imagenet_record() -> dict:
    """The card's record of ImageNet weights: their sha256 once Keras has downloaded them (None before)."""
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / IMAGENET_FILE
    return {"origin": "imagenet", "sha256": hashlib.sha256(cached.read_bytes()).hexdigest() if cached.exists() else None}


@task(**io_step(retry_delay_seconds=5))
def resolve_weights(weights: str) -> tuple[str | None, dict]:
    """'imagenet', 'none', or a path/URI of a weights file copied to local disk for Keras."""
    if weights.lower() == "none":
        return None, {"origin": "none", "sha256": None}
    if weights.lower() == "imagenet":
        return "imagenet", imagenet_record()
    data = storage.read_bytes(weights)
    suffix = ".weights.h5" if weights.endswith(".weights.h5") else Path(weights).suffix or ".h5"
    local = tempfile.NamedTemporaryFile(prefix="vgg16-", suffix=suffix, delete=False)
    local.write(data)
    local.close()
    return local.name, {"origin": weights, "sha256": hashlib.sha256(data).hexdigest()}
