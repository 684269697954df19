"""Read, hash, decode and resize images in parallel; bad files are set aside with their reason.

Inputs are untrusted: reading refuses what is not a regular file, links out of the tree and files
over the size limit (``store.storage``), and decoding runs in killable worker processes with a
memory ceiling and a deadline (``imaging.sandbox``). Whatever is wrong with one input becomes its
reason; only storage faults that may pass (S3 5xx, throttling, resets) are raised, for a retry.
A DICOM input's identifiers come back from the worker checked, and are de-identified here, in the
parent, which alone holds the key (``imaging.dicom_identity``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imaging.defaults import DECODE_TIMEOUT_SECONDS
from imaging.dicom_identity import Study, deidentify_key
from imaging.sandbox import decode_isolated
from model.preprocessing import Preprocessing
from store import storage

__all__ = ["RETRIED_NEXT_RUN", "InputLimits", "LoadedImage", "load_image", "load_images"]

# Ends the reason of a rejection that may pass another night (access denied): such a row is
# reported but never claimed in the ledger, and ``ledger check`` expects no entry for it.
RETRIED_NEXT_RUN = "tried again next run"


@dataclass(frozen=True)
class InputLimits:
    """What one input may cost; the defaults are ``ScreenParameters``'."""

    max_file_bytes: int = 128 * 1024 * 1024
    decode_timeout_seconds: float = DECODE_TIMEOUT_SECONDS
    within: str | None = None  # local links may not lead outside this folder
    reduced_decode: bool = False  # large JPEGs at reduced resolution (only where it passed the gate)
    frontal_chest_only: bool = True  # a DICOM whose header says it is not a frontal chest X-ray is rejected
    deidentify: bool = False  # DICOM UIDs and accession numbers as keyed hashes (CXR_DEIDENTIFY_KEY)


@dataclass(frozen=True)
class LoadedImage:
    uri: str
    sha256: str | None
    pixels: np.ndarray | None  # resized uint8 RGB, or None when rejected
    reason: str | None = None  # why it was rejected
    final: bool = True  # False: the reason may pass (access denied), so the input is tried again next run
    study: Study | None = None  # a DICOM input's identifiers, de-identified when the limits say so


def load_image(uri: str, spec: Preprocessing, limits: InputLimits = InputLimits()) -> LoadedImage:
    """One image, ready for ``model.preprocessing.scale``; never raises for a bad image.

    Raises ``storage.NotFound`` for an input gone since it was listed, storage errors that
    may pass on a retry, and ``DeidentifyKeyMissing`` when de-identification has no key (before reading).
    """
    key = deidentify_key() if limits.deidentify else None
    try:
        data = storage.read_bytes(uri, max_bytes=limits.max_file_bytes, within=limits.within)
    except storage.Unreadable as error:
        return LoadedImage(uri, None, None, error.reason)
    except storage.AccessDenied as error:
        # One object's 403 must not stop the night, nor may a policy fixed tomorrow leave every input
        # rejected for ever: a row now, no ledger claim, another try next run.
        return LoadedImage(uri, None, None, f"{error.reason}: {RETRIED_NEXT_RUN}", final=False)
    digest = hashlib.sha256(data).hexdigest()
    decoded = decode_isolated(data, uri, spec.input_size, limits.decode_timeout_seconds, limits.reduced_decode,
                              limits.frontal_chest_only)
    del data
    study = decoded.study if key is None or decoded.study is None else decoded.study.deidentified(key)
    return LoadedImage(uri, digest, decoded.pixels, decoded.reason, study=study)


def load_images(
    uris: Sequence[str],
    spec: Preprocessing,
    workers: int = 8,
    on_done: Callable[[], None] | None = None,
    limits: InputLimits = InputLimits(),
) -> list[LoadedImage]:
    """``load_image`` for each URI, in order, on a thread pool (OpenCV and I/O release the GIL)."""

    def load(uri: str) -> LoadedImage:
        loaded = load_image(uri, spec, limits)
        if on_done is not None:
            on_done()
        return loaded

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load, uris))
