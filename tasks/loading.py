"""Read, hash, decode and resize images in parallel; bad files are set aside with their reason."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model.preprocessing import Preprocessing, resize
from tasks import storage
from tasks.images import ImageDecodeError, decode_image

__all__ = ["LoadedImage", "load_image", "load_images"]


@dataclass(frozen=True)
class LoadedImage:
    uri: str
    sha256: str | None
    pixels: np.ndarray | None  # resized uint8 RGB, or None when rejected
    reason: str | None = None  # why it was rejected


def load_image(uri: str, spec: Preprocessing) -> LoadedImage:
    """One image, ready for ``model.preprocessing.scale``; never raises for a bad image."""
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return LoadedImage(uri, digest, resize(decode_image(data, uri), spec))
    except ImageDecodeError as error:
        return LoadedImage(uri, digest, None, error.reason)


def load_images(
    uris: Sequence[str],
    spec: Preprocessing,
    workers: int = 8,
    on_done: Callable[[], None] | None = None,
) -> list[LoadedImage]:
    """``load_image`` for each URI, in order, on a thread pool (OpenCV and I/O release the GIL)."""

    def load(uri: str) -> LoadedImage:
        loaded = load_image(uri, spec)
        if on_done is not None:
            on_done()
        return loaded

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load, uris))
