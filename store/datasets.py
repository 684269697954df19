"""Labelled X-ray datasets: discovery, patient-grouped splits, fingerprints and duplicate checks.

A dataset lives at a URI as class sub-folders (class = folder name, case-insensitive) or as a
``manifest.csv`` with columns ``file,class[,patient_id]`` (``file`` relative to the dataset). Any
further manifest columns (source, age group, view, site...) are kept as each image's metadata:
the training flow evaluates within their levels (strata).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from imaging.decode import IMAGE_SUFFIXES
from store import storage

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SIGNATURE",
    "Dataset",
    "DatasetError",
    "DuplicateReport",
    "LabelledImage",
    "Split",
    "TrainingParts",
    "discover_dataset",
    "find_duplicates",
    "fingerprint",
    "hash_images",
    "metadata_columns",
    "require_allowed",
    "split_dataset",
    "training_parts",
]

MANIFEST_NAME = "manifest.csv"
# HMAC of a synthetic dataset's manifest.csv, when CXR_MODEL_SIGNING_KEY is set (store/synthetic_data.py).
MANIFEST_SIGNATURE = MANIFEST_NAME + ".sig"


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the location and the problem."""


@dataclass(frozen=True)
class LabelledImage:
    uri: str
    label: str
    patient_id: str | None = None
    sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # extra manifest columns


@dataclass(frozen=True)
class Dataset:
    uri: str
    items: tuple[LabelledImage, ...]
    source: str  # "manifest" or "folders"
    ignored: tuple[str, ...] = ()  # files found but not used, e.g. images outside class folders
    # sha256 of manifest.csv as read: a signature checked later is checked against what was used.
    manifest_sha256: str | None = field(default=None, compare=False)

    @property
    def classes(self) -> list[str]:
        return sorted({item.label for item in self.items})

    @property
    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(item.label for item in self.items).items()))


@dataclass(frozen=True)
class Split:
    train: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]
    seed: int
    test_fraction: float


@dataclass(frozen=True)
class DuplicateReport:
    """Exact copies (same sha256): under two labels, or on both sides of a split."""

    conflicting_labels: dict[str, list[LabelledImage]] = field(default_factory=dict)
    across_split: dict[str, list[LabelledImage]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.conflicting_labels or self.across_split)

    def lines(self) -> list[str]:
        out = []
        for digest, copies in self.conflicting_labels.items():
            names = ", ".join(f"{c.uri} ({c.label})" for c in copies)
            out.append(f"same image under different labels [{digest[:12]}]: {names}")
        for digest, copies in self.across_split.items():
            names = ", ".join(c.uri for c in copies)
            out.append(f"same image in train and test [{digest[:12]}]: {names}")
        return out


def metadata_columns(items: Sequence[LabelledImage]) -> dict[str, list[str]]:
    """Each extra manifest column and its values, in the order of ``items``."""
    names = sorted({name for item in items for name in item.metadata})
    return {name: [item.metadata.get(name, "") for item in items] for name in names}


def normalise_label(label: str) -> str:
    return label.strip().lower()


def require_allowed(uri: str, prefixes: Sequence[str] | None) -> None:
    """DatasetError unless ``uri`` lies under one of ``prefixes`` (None: anywhere). Compared by
    ``storage.canonical``, so ``..`` and links cannot step out, and by whole path segments, so
    ``s3://cxr/datasets-evil`` is not under ``s3://cxr/datasets``."""
    if prefixes is None:
        return
    place = storage.canonical(uri)
    for prefix in prefixes:
        root = storage.canonical(prefix).rstrip("/")
        if place == root or place.startswith(root + "/"):
            return
    raise DatasetError(f"{uri}: not under the dataset locations training may read ({', '.join(prefixes) or 'none'}; "
                       "CXR_TRAIN_DATASET_PREFIXES)")


def discover_dataset(uri: str) -> Dataset:
    """Find the labelled images at ``uri``: its manifest.csv if there is one, else class folders."""
    files = list(storage.list_files(uri))
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if manifest_uri in files:
        return _from_manifest(uri, manifest_uri, files)
    return _from_folders(uri, files)


def _from_folders(uri: str, files: list[str]) -> Dataset:
    items, ignored = [], []
    for file_uri in files:
        relative = storage.relative_to(file_uri, uri)
        folder, _, rest = relative.partition("/")
        if not rest or not file_uri.lower().endswith(tuple(IMAGE_SUFFIXES)):
            ignored.append(file_uri)
            continue
        items.append(LabelledImage(file_uri, normalise_label(folder)))
    if not items:
        raise DatasetError(
            f"{uri}: no labelled images found: expected class sub-folders of images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) or a {MANIFEST_NAME} with columns file,class[,patient_id]"
        )
    return Dataset(uri, tuple(items), "folders", tuple(ignored))


def _from_manifest(uri: str, manifest_uri: str, files: list[str]) -> Dataset:
    raw = storage.read_bytes(manifest_uri)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:  # a manifest saved in another encoding: say which file, not a traceback
        raise DatasetError(f"{manifest_uri}: not UTF-8 text ({error.reason} at byte {error.start}): save it as "
                           "UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    missing_columns = {"file", "class"} - columns.keys()
    if missing_columns:
        raise DatasetError(
            f"{manifest_uri}: missing column(s) {', '.join(sorted(missing_columns))}; "
            f"expected file,class[,patient_id], found {', '.join(reader.fieldnames or []) or 'nothing'}"
        )
    present = set(files)
    items, absent = [], []
    for line, row in enumerate(reader, start=2):
        name = (row.get(columns["file"]) or "").strip()
        label = normalise_label(row.get(columns["class"]) or "")
        if not name or not label:
            raise DatasetError(f"{manifest_uri}, line {line}: empty file or class")
        file_uri = name if "://" in name else storage.join(uri, name)
        if file_uri not in present:
            absent.append(name)
            continue
        patient = (row.get(columns["patient_id"]) or "").strip() if "patient_id" in columns else ""
        metadata = {name: (row.get(original) or "").strip() for name, original in columns.items()
                    if name not in ("file", "class", "patient_id")}
        items.append(LabelledImage(file_uri, label, patient or None, metadata=metadata))
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise DatasetError(f"{manifest_uri}: {len(absent)} listed file(s) not found under {uri}: {shown}")
    if not items:
        raise DatasetError(f"{manifest_uri}: lists no images")
    listed = {item.uri for item in items} | {manifest_uri, storage.join(uri, MANIFEST_SIGNATURE)}
    ignored = tuple(f for f in files if f not in listed)
    return Dataset(uri, tuple(items), "manifest", ignored, hashlib.sha256(raw).hexdigest())


def hash_images(
    items: Iterable[LabelledImage],
    read: Callable[[str], bytes] = storage.read_bytes,
    workers: int = 8,
    on_done: Callable[[], None] | None = None,
) -> list[LabelledImage]:
    """The items with ``sha256`` filled in from their content (read in parallel).

    ``on_done`` is called once per hashed image, for progress bars.
    """
    items = list(items)

    def digest(item: LabelledImage) -> LabelledImage:
        hashed = replace(item, sha256=hashlib.sha256(read(item.uri)).hexdigest())
        if on_done is not None:
            on_done()
        return hashed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(digest, items))


def fingerprint(items: Iterable[LabelledImage]) -> str:
    """sha256 of the sorted (sha256, label) list: names and order do not matter, content does."""
    entries = []
    for item in items:
        if item.sha256 is None:
            raise ValueError(f"{item.uri}: no sha256; call hash_images first")
        entries.append(f"{item.sha256} {item.label}\n")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def split_dataset(items: Sequence[LabelledImage], test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Stratified by class, grouped by patient: no patient (and no exact copy) on both sides.

    The test side is one fold of ``round(1 / test_fraction)`` stratified group folds, so 0.2
    gives 5 folds. The result depends only on the items and the seed, never on their order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    folds = round(1.0 / test_fraction)
    ordered = sorted(items, key=lambda item: item.uri)
    groups = _groups(ordered)
    if len(set(groups)) < folds:
        raise DatasetError(f"cannot split {len(ordered)} images from {len(set(groups))} patients into {folds} folds")
    labels = [item.label for item in ordered]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, test_index = next(splitter.split(np.zeros(len(ordered)), labels, groups))
    chosen = set(test_index.tolist())
    train = tuple(item for i, item in enumerate(ordered) if i not in chosen)
    test = tuple(item for i, item in enumerate(ordered) if i in chosen)
    return Split(train, test, seed, test_fraction)


# Share of the training patients that training sets aside as validation.
VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class TrainingParts:
    """Training's split of a dataset: the level left out (if any), then patient-held-out test,
    then validation out of what remains; what is left of the patients is the training part."""

    train: tuple[LabelledImage, ...]
    validation: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]
    left_out: tuple[LabelledImage, ...]


def training_parts(items: Sequence[LabelledImage], test_fraction: float, seed: int,
                   leave_out: str | None = None) -> TrainingParts:
    """The one split rule of training, which validate-engines, site evaluation and the benches use
    to rebuild a version's split: an engine or a site figure is only ever held to the very images
    the version was tested on. ``leave_out``: 'COL=LEVEL' (as the card records it) or None."""
    column, _, level = (leave_out or "").partition("=")
    column, level = column.strip(), level.strip()
    left = tuple(item for item in items if column and item.metadata.get(column) == level)
    kept = [item for item in items if not (column and item.metadata.get(column) == level)]
    split = split_dataset(kept, test_fraction=test_fraction, seed=seed)
    fit_part = split_dataset(split.train, test_fraction=VALIDATION_FRACTION, seed=seed + 1)
    return TrainingParts(fit_part.train, fit_part.test, split.test, left)


def _groups(items: Sequence[LabelledImage]) -> list[int]:
    """Group ids joining images of one patient and exact copies (union-find over both keys)."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(items):
        keys = [("patient", item.patient_id)] if item.patient_id else []
        keys += [("sha256", item.sha256)] if item.sha256 else []
        for key in keys:
            if key in first_seen:
                parent[find(index)] = find(first_seen[key])
            else:
                first_seen[key] = index
    return [find(i) for i in range(len(items))]


def find_duplicates(items: Iterable[LabelledImage], split: Split | None = None) -> DuplicateReport:
    """Exact duplicates under two labels, and (given a split) on both of its sides."""
    by_digest: dict[str, list[LabelledImage]] = defaultdict(list)
    for item in items:
        if item.sha256:
            by_digest[item.sha256].append(item)
    conflicting = {d: c for d, c in by_digest.items() if len({item.label for item in c}) > 1}
    across: dict[str, list[LabelledImage]] = {}
    if split is not None:
        test_digests = {item.sha256 for item in split.test if item.sha256}
        for item in split.train:
            if item.sha256 in test_digests:
                across.setdefault(item.sha256, []).append(item)
        for digest in across:
            across[digest] += [item for item in split.test if item.sha256 == digest]
    return DuplicateReport(conflicting, across)
