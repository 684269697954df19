"""The screening ledger: exactly one prediction row per input and model version, ever.

An entry (``ResultsLayout.ledger_entry``) is created with create-if-absent once its prediction is
known, so whichever run claims an input first owns its row; any other run (a rerun, a concurrent
run) skips it or drops its own copy. Entries are never changed or deleted.
"""

from __future__ import annotations

import json

from tasks import storage
from tasks.results import PredictionRow, ResultsLayout

__all__ = ["claim", "done_keys", "read_entry"]


def done_keys(results_uri: str, model_version: str) -> set[str]:
    """Keys (``results.entry_key``) of the inputs already screened by this model version: one
    listing, no reads."""
    folder = ResultsLayout(results_uri).ledger(model_version)  # absent before this version's first run
    return {storage.relative_to(uri, folder)[: -len(".json")]
            for uri in storage.list_files(folder, {".json"}, missing_ok=True)}


def claim(results_uri: str, row: PredictionRow) -> bool:
    """Record ``row`` for its input; False when another run recorded that input first."""
    uri = ResultsLayout(results_uri).ledger_entry(row.model_version, row.image_uri)
    return storage.create_if_absent(uri, json.dumps(row.to_record(), sort_keys=True).encode())


def read_entry(results_uri: str, model_version: str, image_uri: str, classes: list[str]) -> PredictionRow:
    uri = ResultsLayout(results_uri).ledger_entry(model_version, image_uri)
    return PredictionRow.from_record(json.loads(storage.read_bytes(uri)), classes)
