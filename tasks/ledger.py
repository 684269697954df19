"""The screening ledger: exactly one prediction row per input and model version, ever.

    <results>/ledger/<model version>/<sha256 of the image URI>.json   the row, as JSON

An entry is created with create-if-absent once its prediction is known, so whichever run claims
an input first owns its row; any other run (a rerun, a concurrent run) skips it or drops its own
copy. Entries are never changed or deleted.
"""

from __future__ import annotations

import hashlib
import json

from tasks import storage

__all__ = ["claim", "done_keys", "entry_key", "read_entry"]


def _folder(results_uri: str, model_version: str) -> str:
    return storage.join(results_uri, "ledger", model_version)


def entry_key(image_uri: str) -> str:
    return hashlib.sha256(image_uri.encode()).hexdigest()


def done_keys(results_uri: str, model_version: str) -> set[str]:
    """Keys of the inputs already screened by this model version (one listing, no reads)."""
    folder = _folder(results_uri, model_version)  # absent before the first run for this model version
    return {storage.relative_to(uri, folder)[: -len(".json")]
            for uri in storage.list_files(folder, {".json"}, missing_ok=True)}


def claim(results_uri: str, model_version: str, row: dict) -> bool:
    """Record ``row`` for its input; False when another run recorded that input first."""
    uri = storage.join(_folder(results_uri, model_version), entry_key(row["image_uri"]) + ".json")
    return storage.create_if_absent(uri, json.dumps(row, sort_keys=True).encode())


def read_entry(results_uri: str, model_version: str, image_uri: str) -> dict:
    uri = storage.join(_folder(results_uri, model_version), entry_key(image_uri) + ".json")
    return json.loads(storage.read_bytes(uri))
