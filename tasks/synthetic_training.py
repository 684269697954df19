"""Synthetic images in training (#14, ``train --synthetic``): a synthetic dataset's minority-class
images join the training part of the split, never validation or test, and only when the generator
learned from exactly this run's training split, passed the memorisation gate, and its signed card
vouches for every image's sha256 (the manifest itself is not signed)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.preprocessing import Preprocessing
from model.training import TrainingData
from store import storage
from store.datasets import DatasetError, fingerprint
from store.generators import load_generator
from store.synthetic_data import SyntheticOrigin, synthetic_origin
from tasks.train_data import LabelledArrays, TrainingSplit, discover, load_labelled

__all__ = ["add_synthetic", "check_vouched", "vouched_images", "with_synthetic"]


def add_synthetic(data: TrainingData, loaded: LabelledArrays, split: TrainingSplit, synthetic_uri: str, share: float,
                  spec: Preprocessing) -> tuple[TrainingData, dict]:
    """``data`` with a synthetic dataset's minority-class images added to its training part (see
    ``with_synthetic``), read and resized into the model's input as real images are."""
    synthetic = discover(synthetic_uri)
    origin = synthetic_origin(synthetic)  # not a synthetic dataset, or several splits: refused before reading images
    vouched = vouched_images(origin, fingerprint([loaded.items[row] for row in split.train]))
    images = load_labelled(synthetic.items, spec)
    check_vouched(images, synthetic.uri, vouched, len(synthetic.items))
    return with_synthetic(data, loaded, split, images, origin, synthetic_uri, share)


def vouched_images(origin: SyntheticOrigin, train_fingerprint: str) -> dict[str, tuple[str, str]]:
    """What the manifest's generators vouch for, file name -> (class, sha256), from their cards, not
    from the unsigned manifest: each generator is loaded (signature and sha256 checks), must have
    passed the memorisation gate and have learned from this run's training split."""
    vouched = {}
    for version in origin.generator_versions:
        _, card = load_generator(origin.generator_store, version)
        where = f"generator {version} in {origin.generator_store}"
        if card.quality.get("passed") is not True:
            raise DatasetError(f"{where}: its card does not record a passed memorisation check")
        if card.dataset.get("train_fingerprint") != train_fingerprint:
            raise DatasetError(f"{where}: it learned from another training split than this run's: its images may "
                               "carry this run's validation or test patients")
        images = card.synthesized.get("images")
        if not isinstance(images, dict):
            raise DatasetError(f"{where}: its card lists no images' sha256 (written before they were recorded)")
        vouched.update({name: (str(card.synthesized.get("class")), str(digest)) for name, digest in images.items()})
    return vouched


def check_vouched(images: LabelledArrays, dataset_uri: str, vouched: dict[str, tuple[str, str]], listed: int) -> None:
    """Every synthetic image read is one its generator's card lists, with that class and sha256;
    none left out as unreadable (a manifest's rows are all the generator's or the dataset is refused)."""
    if len(images.items) != listed:
        raise DatasetError(f"{dataset_uri}: {listed - len(images.items)} synthetic image(s) could not be read")
    for item in images.items:
        name = storage.relative_to(item.uri, dataset_uri)
        if name not in vouched:
            raise DatasetError(f"{item.uri}: not an image its generator's card lists")
        label, digest = vouched[name]
        if item.label != label:
            raise DatasetError(f"{item.uri}: labelled {item.label!r}, its generator made it as {label!r}")
        if item.sha256 != digest:
            raise DatasetError(f"{item.uri}: sha256 differs from the one its generator's card recorded: not the "
                               "image the generator made")


def _label_index(split: TrainingSplit, label: str, uri: str) -> int:
    if label in split.classes:
        return split.classes.index(label)
    if len(split.classes) == 2 and split.classes[0] == f"non-{split.positive}":  # binary: the rest are negative
        return 0
    raise DatasetError(f"{uri}: class {label!r} is not one this model learns ({', '.join(split.classes)})")


def _share_class_weight(weights: np.ndarray, real_labels: np.ndarray, added: int, label: int) -> np.ndarray:
    """Training weights with ``added`` synthetic images of class ``label`` appended. They join their
    class's weight, they do not add to it: each gets the class's mean weight, then the whole class is
    scaled back to the total its real images had, so a weighting's balance between classes (and
    between strata, inside the real images) is what it was without them."""
    weights = np.asarray(weights, np.float64)
    inside = real_labels == label
    total = weights[inside].sum()
    extended = np.concatenate([weights, np.full(added, weights[inside].mean() if inside.any() else 1.0)])
    of_class = np.concatenate([inside, np.ones(added, bool)])
    if total > 0:
        extended[of_class] *= total / extended[of_class].sum()
    return extended.astype(np.float32)


@task(cache_policy=NO_CACHE)
def with_synthetic(data: TrainingData, loaded: LabelledArrays, split: TrainingSplit, synthetic: LabelledArrays,
                   origin: SyntheticOrigin, synthetic_uri: str, share: float) -> tuple[TrainingData, dict]:
    """Synthetic images of the training split's minority class appended to ``data``'s training part
    only (validation and test stay real), at most ``share`` of that class's training images after
    adding (n <= share / (1 - share) x its real ones). Refused unless the generator learned from
    exactly this run's training split: otherwise its images may carry validation or test patients."""
    logger = get_run_logger()
    train_fingerprint = fingerprint([loaded.items[row] for row in split.train])
    if origin.train_fingerprint != train_fingerprint:
        raise DatasetError(
            f"{synthetic_uri}: its generator learned from another training split (split seed {origin.split_seed}, test "
            f"fraction {origin.test_fraction:g}, fingerprint {origin.train_fingerprint[:12]}; this run's is "
            f"{train_fingerprint[:12]}): its images may carry this run's validation or test patients. Synthesize "
            "again from this dataset with this --seed and --test-fraction (and no --leave-out)")
    real_digests = {item.sha256 for item in loaded.items}
    copies = [item.uri for item in synthetic.items if item.sha256 in real_digests]
    if copies:
        raise DatasetError(f"{synthetic_uri}: {len(copies)} synthetic image(s) are exact copies of real ones, e.g. {copies[0]}")
    real_labels = split.labels[split.train]
    minority = int(np.argmin(np.bincount(real_labels, minlength=len(split.classes))))
    labels = np.array([_label_index(split, item.label, item.uri) for item in synthetic.items])
    candidates = np.flatnonzero(labels == minority)
    if not len(candidates):
        raise DatasetError(f"{synthetic_uri}: no images of the minority class {split.classes[minority]!r} of the "
                           f"training split (it holds {', '.join(sorted({item.label for item in synthetic.items}))})")
    real_minority = int((real_labels == minority).sum())
    chosen = candidates[: min(len(candidates), int(share / (1.0 - share) * real_minority + 1e-9))]
    extended = {
        "x_train": np.concatenate([data.x_train, synthetic.images[chosen]]),
        "y_train": np.concatenate([data.y_train, labels[chosen]]),
        "w_train": None if data.w_train is None else _share_class_weight(data.w_train, real_labels, len(chosen), minority),
        "weightings": tuple((name, None if w is None else _share_class_weight(w, real_labels, len(chosen), minority), v)
                            for name, w, v in data.weightings),
    }
    used = [synthetic.items[index] for index in chosen]
    info = {"uri": synthetic_uri, "generator_versions": list(origin.generator_versions), "seeds": list(origin.seeds),
            "class": split.classes[minority], "share": share, "count": len(chosen), "available": int(len(candidates)),
            "real_minority_train_images": real_minority, "fingerprint": fingerprint(used) if used else None}
    logger.info("Synthetic: %d of %d %s images from %s (generator %s) join the %d real ones in training only "
                "(share %.2f); validation and test stay real", len(chosen), len(candidates), split.classes[minority],
                synthetic_uri, ", ".join(origin.generator_versions), real_minority,
                len(chosen) / max(len(chosen) + real_minority, 1))
    return replace(data, **extended), info
