"""Site evaluations kept beside their model version, and the gate that makes serving wait for one.

    <store>/<version>/evaluations/<evaluation id>/reliability.png, evaluation.md
    <store>/<version>/evaluations/<evaluation id>/evaluation.json.sig   HMAC of evaluation.json, when
                                                                          CXR_MODEL_SIGNING_KEY is set
    <store>/<version>/evaluations/<evaluation id>/evaluation.json       written last: the figures, the
                                                                          verdict, the sha256 of the other
                                                                          files and of the version's card.json

Evaluation ids (``e20261206-201500-ab12cd``) sort by time. An evaluation is bound to its version
by the sha256 of the card.json it lies beside: moved to another version, it is refused. Nothing
read back is trusted: the record is checked against its schema, its signature (with a signing key
set), its version and card, and its verdict is recomputed from its figures.

With ``CXR_REQUIRE_EVALUATION=true`` a version serves only when its latest evaluation is valid and
fit (``require_passing``): the newest evidence decides, so a later failing evaluation withdraws an
earlier pass, and a damaged or tampered latest evaluation stops serving until it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from model import stored_json
from model.acceptance import Verdict
from model.bundle import BundleError, ModelCard, is_safe_name, sign
from model.site_evaluation import evaluation_problem, verdict_of
from store import registry, storage
from store.clock import utc_now

__all__ = ["EVALUATION", "EVALUATIONS", "REQUIRE_VARIABLE", "EvaluationRequired", "StoredEvaluation", "card_sha256",
           "evaluation_folder", "evaluation_required", "list_evaluations", "new_evaluation_id", "require_passing",
           "write_evaluation"]

EVALUATIONS = registry.EVALUATIONS
EVALUATION = "evaluation.json"
EVALUATION_SIGNATURE = "evaluation.json.sig"
REQUIRE_VARIABLE = "CXR_REQUIRE_EVALUATION"


class EvaluationRequired(BundleError):
    """The version may not serve: it has no valid, passing site evaluation, and one is required."""


@dataclass(frozen=True)
class StoredEvaluation:
    """One evaluation as read back: its record and recomputed verdict, or why it cannot be used."""

    evaluation_id: str
    uri: str
    record: dict | None = None
    verdict: Verdict | None = None
    problem: str | None = None

    @property
    def fit(self) -> bool:
        return self.problem is None and self.verdict is not None and self.verdict.fit


def evaluation_required() -> bool:
    """Whether ``CXR_REQUIRE_EVALUATION`` asks for a passing evaluation before a version serves
    (read as pydantic reads a boolean setting: true/false, 1/0, yes/no, on/off)."""
    value = os.environ.get(REQUIRE_VARIABLE, "").strip()
    if not value:
        return False
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise ValueError(f"{REQUIRE_VARIABLE}={value!r} is neither true nor false") from None


def new_evaluation_id() -> str:
    """Sortable by time, unique across concurrent evaluations."""
    return utc_now().strftime("e%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def evaluation_folder(store_uri: str, version: str, evaluation_id: str) -> str:
    if not is_safe_name(version) or not is_safe_name(evaluation_id):
        raise BundleError(f"{store_uri}: {version!r} / {evaluation_id!r} is not a version and evaluation id")
    return storage.join(store_uri, version, EVALUATIONS, evaluation_id)


def card_sha256(store_uri: str, version: str) -> str:
    """The sha256 of the version's card.json as stored (its signature checked with a key set)."""
    folder = storage.join(store_uri, version)
    return hashlib.sha256(registry.read_signed_card(folder, lambda: "no such model version")).hexdigest()


def write_evaluation(store_uri: str, card: ModelCard, record: dict, files: dict[str, bytes]) -> str:
    """The files, the signature (with a signing key), then evaluation.json, which lists the files'
    sha256 and marks the evaluation complete; returns its folder. Never overwrites one."""
    folder = evaluation_folder(store_uri, card.version, record["evaluation_id"])
    if {EVALUATION, EVALUATION_SIGNATURE} & files.keys() or not all(map(is_safe_name, files)):
        raise ValueError(f"{folder}: not evaluation files: {sorted(files)}")
    data = json.dumps(_plain({**record, "files": {name: hashlib.sha256(content).hexdigest()
                                                  for name, content in sorted(files.items())}}),
                      indent=2, sort_keys=True, allow_nan=False).encode()
    problem = _problem(data, card, record["model_card_sha256"], record["evaluation_id"])
    if problem:  # never write what reading would refuse
        raise BundleError(f"{storage.join(folder, EVALUATION)}: {problem}")
    for name, content in files.items():
        storage.write_bytes(storage.join(folder, name), content)
    key = registry.signing_key()
    if key is not None:
        storage.write_bytes(storage.join(folder, EVALUATION_SIGNATURE), sign(data, key))
    uri = storage.join(folder, EVALUATION)
    if not storage.create_if_absent(uri, data) and storage.read_bytes(uri) != data:  # equal: an earlier try's
        raise BundleError(f"{folder}: evaluation {record['evaluation_id']} already exists")
    return folder


def _plain(value: object) -> object:
    """Standard JSON: a figure that could not be measured (NaN) is null."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _problem(data: bytes, card: ModelCard, card_digest: str, evaluation_id: str) -> str | None:
    return _checked(data, card, card_digest, evaluation_id)[1]


def _checked(data: bytes, card: ModelCard, card_digest: str, evaluation_id: str) -> tuple[dict | None, str | None]:
    """The record, or why it cannot be used (after the file's URI, which the caller puts first)."""
    try:
        record = stored_json.loads(data, EVALUATION)
        problem = evaluation_problem(record)
        if problem:
            return None, problem
        if record["model_version"] != card.version or record["model_card_sha256"] != card_digest:
            return None, (f"an evaluation of {record['model_version']} (card sha256 {record['model_card_sha256'][:12]}"
                          f"...), not of {card.version} as its card.json now is ({card_digest[:12]}...): moved or stale")
        if record["evaluation_id"] != evaluation_id:
            return None, f"it says evaluation {record['evaluation_id']!r}, but it lies in folder {evaluation_id!r}"
        verdict_of(record)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as error:
        # ValueError: bad JSON, bad UTF-8, integers beyond 2**53, non-finite numbers, nesting too
        # deep (model.stored_json), criteria out of range.
        return None, f"not a valid evaluation ({type(error).__name__}: {str(error)[:200]})"
    return record, None


def read_evaluation(store_uri: str, card: ModelCard, card_digest: str, evaluation_id: str) -> StoredEvaluation:
    """One evaluation, checked (signature, schema, version, card, verdict); a problem is returned,
    not raised, naming the file."""
    folder = evaluation_folder(store_uri, card.version, evaluation_id)
    uri = storage.join(folder, EVALUATION)
    try:
        data = storage.read_bytes(uri, max_bytes=stored_json.MAX_DOCUMENT_BYTES)
        registry.check_signature(storage.join(folder, EVALUATION_SIGNATURE), data, EVALUATION,
                                 f"evaluate it again with the key set: cxr-screen evaluate SITE_DATASET --model-store "
                                 f"{store_uri} --model-version {card.version}")
    except (BundleError, storage.StorageError) as error:
        return StoredEvaluation(evaluation_id, uri, problem=str(error))
    record, problem = _checked(data, card, card_digest, evaluation_id)
    if problem:
        return StoredEvaluation(evaluation_id, uri, problem=f"{uri}: {problem}")
    return StoredEvaluation(evaluation_id, uri, record, verdict_of(record))


def evaluation_ids(store_uri: str, version: str) -> list[str]:
    """Ids of the complete evaluations (those with evaluation.json) of a version, oldest first."""
    base = storage.join(store_uri, version, EVALUATIONS)
    found = storage.list_files(base, {"/" + EVALUATION}, missing_ok=True)
    names = {storage.relative_to(uri, base).split("/")[0] for uri in found}
    return sorted(name for name in names if is_safe_name(name))


def list_evaluations(store_uri: str, card: ModelCard) -> list[StoredEvaluation]:
    """Every complete evaluation of the card's version, checked, oldest first."""
    ids = evaluation_ids(store_uri, card.version)
    if not ids:
        return []
    digest = card_sha256(store_uri, card.version)
    return [read_evaluation(store_uri, card, digest, evaluation_id) for evaluation_id in ids]


def require_passing(store_uri: str, card: ModelCard, why: str = f"{REQUIRE_VARIABLE} is set") -> StoredEvaluation:
    """The version's latest evaluation, if it is valid and fit; EvaluationRequired otherwise, saying
    what to run."""
    command = f"cxr-screen evaluate SITE_DATASET --model-store {store_uri} --model-version {card.version}"
    ids = evaluation_ids(store_uri, card.version)
    if not ids:
        raise EvaluationRequired(f"model {card.version} has no site evaluation, and {why}: it serves only after a "
                                 f"passing one on site data ({command})")
    latest = read_evaluation(store_uri, card, card_sha256(store_uri, card.version), ids[-1])
    if latest.problem:
        raise EvaluationRequired(f"model {card.version}: its latest evaluation cannot be used ({latest.problem}), and "
                                 f"{why}: evaluate it again ({command})")
    if not latest.fit:
        raise EvaluationRequired(f"model {card.version}: its latest evaluation {latest.evaluation_id} on "
                                 f"{latest.record['dataset']['uri']} found it {latest.verdict.line}, and {why}")
    return latest
