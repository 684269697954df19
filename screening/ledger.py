"""The screening ledger: exactly one prediction row per input and model version, ever.

An entry (``ResultsLayout.ledger_entry``) is created with create-if-absent once its prediction is
known, so whichever run claims an input first owns its row; any other run (a rerun, a concurrent
run) skips it or drops its own copy. Entries are never changed or deleted. An entry read back is
checked (``read_entry``): it must be a valid row of this input and model version.
"""

from __future__ import annotations

import json

from screening.results import PredictionRow, ResultsLayout
from store import storage

__all__ = ["LedgerError", "claim", "done_keys", "read_entry"]


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


class LedgerError(ValueError):
    """A ledger entry that is not what this code wrote: its row cannot be trusted or used."""


def read_entry(results_uri: str, model_version: str, image_uri: str, classes: list[str]) -> PredictionRow:
    """The row recorded for ``image_uri``; LedgerError, naming the entry, for one that is damaged or
    belongs elsewhere (another input or model version: a copied or forged file)."""
    uri = ResultsLayout(results_uri).ledger_entry(model_version, image_uri)
    data = storage.read_bytes(uri)
    try:
        row = PredictionRow.from_record(json.loads(data), classes)
    except ValueError as error:  # JSON, UTF-8 and schema alike
        raise LedgerError(f"{uri}: not a ledger entry: {error}") from error
    if row.model_version != model_version or row.image_uri != image_uri:
        raise LedgerError(f"{uri}: records {row.image_uri!r} for model {row.model_version}, not {image_uri!r} "
                          f"for model {model_version}")
    return row
