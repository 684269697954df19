"""Synthetic datasets (#14): the layout ``synthesize`` writes and ``train --synthetic`` reads.

    <out>/<class>/<generator version>-<seed>-<index>.png   grayscale PNG at the generator's size
    <out>/manifest.csv.sig  HMAC of manifest.csv, when CXR_MODEL_SIGNING_KEY is set
    <out>/manifest.csv   written last; columns file, class, patient_id (the dataset loader's), then
                         synthetic (true), generator_version, generator_store (where its bundle
                         lies: its card vouches for every image's sha256), seed (of the images' noise),
                         split_seed, test_fraction and train_fingerprint (the training split the
                         generator learned from, which ``train --synthetic`` must match)

With a signing key set, ``synthetic_origin`` refuses a manifest that is unsigned, whose signature
does not match, or that changed since the dataset was read: the manifest names the generator store
whose cards vouch for the images, so whoever could edit it could name another store.

One module owns these columns: the writer and the reader below.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imaging.raster import encode_png
from model.bundle import BundleError, sign
from store import registry, storage
from store.datasets import MANIFEST_NAME, MANIFEST_SIGNATURE, Dataset, DatasetError

__all__ = ["REWRITE_MANIFEST", "SyntheticOrigin", "encode_images", "synthetic_origin", "write_images", "write_manifest",
           "write_synthetic_dataset"]

REWRITE_MANIFEST = "write the synthetic dataset again with the key set (cxr-screen synthesize)"
COLUMNS = ("file", "class", "patient_id", "synthetic", "generator_version", "generator_store", "seed", "split_seed",
           "test_fraction", "train_fingerprint")


@dataclass(frozen=True)
class SyntheticOrigin:
    """Where a synthetic dataset's images came from, as its manifest says."""

    generator_versions: tuple[str, ...]
    generator_store: str
    seeds: tuple[str, ...]
    split_seed: int
    test_fraction: float
    train_fingerprint: str


def encode_images(label: str, images: np.ndarray, version: str, seed: int) -> dict[str, bytes]:
    """``images`` (uint8 ``(n, s, s)``) of class ``label`` as PNG bytes by their file name in the
    dataset (``<class>/<version>-<seed>-<index>.png``)."""
    return {f"{label}/{version}-{seed}-{index:05d}.png": encode_png(image) for index, image in enumerate(images)}


def write_images(out_uri: str, files: dict[str, bytes], workers: int = 8) -> None:
    """The images only: without a manifest the location is no synthetic dataset yet (``train
    --synthetic`` refuses it), so a failure before the manifest publishes nothing usable. Writing the
    same bytes again (a retried step) is harmless."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # S3 puts are latency-bound
        list(pool.map(lambda item: storage.write_bytes(storage.join(out_uri, item[0]), item[1]), files.items()))


def write_manifest(out_uri: str, label: str, files: dict[str, bytes], version: str, seed: int, split_seed: int,
                   test_fraction: float, train_fingerprint: str, generator_store: str) -> str:
    """manifest.csv, written last of all (after the generator's card, which vouches for each
    image's sha256), its signature just before it when a signing key is set; returns its URI. The
    same manifest again (a retry) is accepted, another one refused (and its signature left alone)."""
    rows = [{"file": name, "class": label, "patient_id": f"synthetic-{version}-{index:05d}", "synthetic": "true",
             "generator_version": version, "generator_store": generator_store, "seed": str(seed),
             "split_seed": str(split_seed), "test_fraction": repr(float(test_fraction)),
             "train_fingerprint": train_fingerprint} for index, name in enumerate(files)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest, manifest_uri = text.getvalue().encode(), storage.join(out_uri, MANIFEST_NAME)

    def written_before() -> None:
        if storage.read_bytes(manifest_uri) != manifest:
            raise DatasetError(f"{manifest_uri}: another run wrote a dataset to {out_uri} meanwhile")

    if storage.exists(manifest_uri):  # before replacing the signature of another run's manifest
        written_before()
        return manifest_uri
    key = registry.signing_key()
    if key is not None:
        storage.write_bytes(storage.join(out_uri, MANIFEST_SIGNATURE), sign(manifest, key))
    if not storage.create_if_absent(manifest_uri, manifest):
        written_before()
    return manifest_uri


def write_synthetic_dataset(out_uri: str, label: str, images: np.ndarray, version: str, seed: int, split_seed: int,
                            test_fraction: float, train_fingerprint: str, generator_store: str) -> str:
    """Images, then the manifest; returns the manifest's URI. (The synthesize flow publishes the
    generator's card between the two: tasks/synthesis.py.)"""
    files = encode_images(label, images, version, seed)
    write_images(out_uri, files)
    return write_manifest(out_uri, label, files, version, seed, split_seed, test_fraction, train_fingerprint,
                          generator_store)


def synthetic_origin(dataset: Dataset) -> SyntheticOrigin:
    """The origin of a synthetic dataset, checked: every row synthetic=true, one split. Refuses a
    dataset that is not one (it would put real images of unknown provenance into training)."""
    where = storage.join(dataset.uri, MANIFEST_NAME)
    if dataset.source != "manifest":
        raise DatasetError(f"{dataset.uri}: not a synthetic dataset: no {MANIFEST_NAME} (write one with "
                           "'cxr-screen synthesize')")
    _check_signed(dataset, where)
    missing = [name for name in COLUMNS[3:] if any(name not in item.metadata for item in dataset.items)]
    if missing:
        raise DatasetError(f"{where}: not a synthetic dataset: column(s) {', '.join(missing)} missing")
    not_synthetic = [item.uri for item in dataset.items if item.metadata["synthetic"].lower() != "true"]
    if not_synthetic:
        raise DatasetError(f"{where}: {len(not_synthetic)} row(s) without synthetic=true, e.g. {not_synthetic[0]}")

    def one(name: str) -> str:
        values = sorted({item.metadata[name] for item in dataset.items})
        if len(values) != 1:
            raise DatasetError(f"{where}: images from {len(values)} different values of {name} ({', '.join(values)}): "
                               "one synthetic dataset comes from one split")
        return values[0]

    split_seed, test_fraction = one("split_seed"), one("test_fraction")
    try:
        split_seed, test_fraction = int(split_seed), float(test_fraction)
    except ValueError as error:
        raise DatasetError(f"{where}: split_seed or test_fraction is not a number: {error}") from None
    if not 0.0 < test_fraction < 1.0:  # also refuses nan and inf
        raise DatasetError(f"{where}: test_fraction {test_fraction!r} is not a fraction in (0, 1)")
    versions = _distinct(dataset.items, "generator_version")
    if "" in versions:
        raise DatasetError(f"{where}: a row without generator_version: every synthetic image names its generator")
    store = one("generator_store")
    if not store:
        raise DatasetError(f"{where}: no generator_store: the generator's card is what vouches for the images")
    return SyntheticOrigin(versions, store, _distinct(dataset.items, "seed"), split_seed, test_fraction,
                           one("train_fingerprint"))


def _check_signed(dataset: Dataset, where: str) -> None:
    """With a signing key set: the manifest as read (``dataset.manifest_sha256``) is the one signed
    beside it; DatasetError naming it otherwise. Without a key, nothing is checked."""
    if registry.signing_key() is None:
        return
    data = storage.read_bytes(where)
    try:
        registry.check_signature(storage.join(dataset.uri, MANIFEST_SIGNATURE), data, MANIFEST_NAME, REWRITE_MANIFEST)
    except BundleError as error:
        raise DatasetError(str(error)) from None
    if dataset.manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != dataset.manifest_sha256:
        raise DatasetError(f"{where}: changed since the dataset was read: read it again")


def _distinct(items: Sequence, name: str) -> tuple[str, ...]:
    return tuple(sorted({item.metadata[name] for item in items}))
