"""Which engines may serve a model version, as checked against fp32 on its test split.

    <store>/<version>/engines.json        the checks (model.inference.EngineCheck), bound to the
                                          version's model.keras by its sha256, and the sha256 of
                                          each engine's own files
    <store>/<version>/engines.json.sig    HMAC-SHA256 of engines.json, when CXR_MODEL_SIGNING_KEY is set
    <store>/<version>/model-int8.xml|bin  the int8 engine (OpenVINO IR, quantised by NNCF)

The checks live beside the bundle, not in its card: a version published before an engine existed
can be checked later (``cxr-screen validate-engines``) without touching its immutable card. They
are trusted no more than the card: bound to the model's sha256, validated, signature-checked.
A version without valid checks is served by fp32 alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

from model import stored_json
from model.bundle import BundleError, ModelCard, sign
from model.inference import (
    ENGINES,
    EXPLANATION_GATE,
    GATE,
    INT8_FILES,
    REDUCED_DECODE,
    EngineCheck,
    explanation_passes,
    passes_gate,
)
from store import registry, storage
from store.clock import utc_timestamp

__all__ = [
    "ENGINES_FILE",
    "ENGINES_SIGNATURE",
    "ENGINE_FILES",
    "explaining_engines",
    "load_artifacts",
    "record_checks",
    "reduced_decode_allowed",
    "validated_engines",
]

ENGINES_FILE, ENGINES_SIGNATURE, ENGINE_FILES = registry.ENGINES, registry.ENGINES_SIGNATURE, registry.ENGINE_FILES
logger = logging.getLogger(__name__)


def record_checks(store_uri: str, card: ModelCard, checks: Sequence[EngineCheck],
                  artifacts: dict[str, bytes] | None = None) -> str:
    """Write the engines' files, then the checks of ``card``'s version (which vouch for them);
    returns the checks' URI."""
    folder = storage.join(store_uri, card.version)
    artifacts = artifacts or {}
    if not set(artifacts) <= set(INT8_FILES):
        raise ValueError(f"not engine files: {sorted(set(artifacts) - set(INT8_FILES))}")
    for name, content in artifacts.items():
        storage.write_bytes(storage.join(folder, name), content)
    data = json.dumps({"model_version": card.version, "model_sha256": card.model_sha256, "gate": GATE,
                       "explanation_gate": EXPLANATION_GATE,
                       "checked_at": utc_timestamp(),
                       "checks": {check.engine: check.to_dict() for check in checks},
                       "files": {name: hashlib.sha256(content).hexdigest() for name, content in artifacts.items()}},
                      indent=2, sort_keys=True).encode()
    key = registry.signing_key()
    if key is not None:
        storage.write_bytes(storage.join(folder, ENGINES_SIGNATURE), sign(data, key))
    storage.write_bytes(storage.join(folder, ENGINES_FILE), data)
    return storage.join(folder, ENGINES_FILE)


def validated_engines(store_uri: str, card: ModelCard) -> tuple[list[str], str]:
    """The engines that passed the gate for this version (fp32 always), and a line saying why the
    others may not serve it."""
    uri = storage.join(store_uri, card.version, ENGINES_FILE)
    try:
        checks, files = _read_record(uri, store_uri, card)
    except storage.NotFound:
        return ["fp32"], (f"no engine checks recorded for {card.version}: fp32 only "
                          f"(cxr-screen validate-engines {card.version})")
    except BundleError as error:
        logger.warning("%s; fp32 only", error)
        return ["fp32"], f"{error}: fp32 only"
    passed = ["fp32", *(engine for engine in ENGINES if engine != "fp32" and checks.get(engine, {}).get("passed"))]
    if "int8" in passed and not set(INT8_FILES) <= set(files):
        passed.remove("int8")
    failed = [f"{engine} failed the gate ({EngineCheck(**checks[engine]).summary})"
              for engine in ENGINES if engine in checks and not checks[engine].get("passed")]
    unchecked = [engine for engine in ENGINES if engine != "fp32" and engine not in checks]
    notes = failed + ([f"not checked: {', '.join(unchecked)}"] if unchecked else [])
    return passed, "; ".join(notes)


def explaining_engines(store_uri: str, card: ModelCard) -> list[str]:
    """The engines whose own forward pass may give this version's explanations: fp32 always, another
    once its explanations passed their gate (model.inference.EXPLANATION_GATE)."""
    try:
        checks, _ = _read_record(storage.join(store_uri, card.version, ENGINES_FILE), store_uri, card)
    except (storage.NotFound, BundleError):
        return ["fp32"]
    return ["fp32", *(engine for engine in ENGINES if checks.get(engine, {}).get("explanation_passed"))]


def reduced_decode_allowed(store_uri: str, card: ModelCard) -> bool:
    """Whether large JPEGs may be decoded at reduced resolution for this version: only after that
    shortcut passed the gate on its test split."""
    try:
        checks, _ = _read_record(storage.join(store_uri, card.version, ENGINES_FILE), store_uri, card)
    except (storage.NotFound, BundleError):
        return False
    return bool(checks.get(REDUCED_DECODE, {}).get("passed"))


def load_artifacts(store_uri: str, card: ModelCard, engine: str) -> dict[str, bytes] | None:
    """The files ``engine`` runs for this version, each checked against its sha256 in the record;
    None for an engine that runs the Keras model itself."""
    if engine != "int8":
        return None
    _, files = _read_record(storage.join(store_uri, card.version, ENGINES_FILE), store_uri, card)
    loaded = {}
    for name in INT8_FILES:
        uri = storage.join(store_uri, card.version, name)
        content = storage.read_bytes(uri)
        if hashlib.sha256(content).hexdigest() != files.get(name):
            raise BundleError(f"{uri}: does not match its sha256 in {ENGINES_FILE}: damaged or replaced")
        loaded[name] = content
    return loaded


# Recorded together under rule 2 (the rates' figures are None together where a class is absent).
_RULE_TWO = ("probability_difference_q99", "flips", "far_flips")
_OPTIONAL_SHARES = ("probability_difference_q99", "sensitivity_change", "sensitivity_noise", "specificity_change",
                    "specificity_noise", "explanation_lung_share_difference")


def _share(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _correlation(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1 <= value <= 1


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_record(uri: str, store_uri: str, card: ModelCard) -> tuple[dict[str, dict], dict[str, str]]:
    """The record's checks (verdicts recomputed) and engine file digests; BundleError naming it
    when it is unsigned or its signature does not match (with a key set), or it is no record."""
    data = storage.read_bytes(uri)
    registry.check_signature(storage.join(store_uri, card.version, ENGINES_SIGNATURE), data, ENGINES_FILE,
                             f"record the checks again with the key set: cxr-screen validate-engines {card.version}")
    try:
        record = stored_json.loads(data, uri)
    except stored_json.StoredStateError as error:
        raise BundleError(f"{error} (not an engine record)") from None
    try:
        if record["model_sha256"] != card.model_sha256 or record["model_version"] != card.version:
            raise BundleError(f"{uri}: checks of another model, not of {card.version}'s model.keras")
        checks = {}
        for engine, fields in record["checks"].items():
            check = EngineCheck(**fields)
            if engine not in (*ENGINES, REDUCED_DECODE) or check.engine != engine:
                raise ValueError(f"engine {engine!r}")
            rule_two = [getattr(check, name) for name in _RULE_TWO]
            explained = (check.explanation_correlation, check.explanation_lung_share_difference)
            if (len({value is None for value in rule_two}) > 1 or len({value is None for value in explained}) > 1
                    or (check.flips is not None and not (_count(check.flips) and _count(check.far_flips)
                                                         and check.far_flips <= check.flips <= check.images))):
                raise ValueError(f"the figures of {engine} (incomplete or inconsistent)")
            optional = [getattr(check, name) for name in _OPTIONAL_SHARES]
            if not (_share(check.flag_agreement) and _share(check.max_probability_difference)
                    and (check.auc_difference is None or _share(check.auc_difference))
                    and all(value is None or _share(value) for value in optional)
                    and (check.explanation_correlation is None or _correlation(check.explanation_correlation))
                    and all(value is None or _count(value) for value in (check.flips, check.far_flips))
                    and _count(check.images) and check.images > 0):
                raise ValueError(f"the figures of {engine}")
            # The verdicts are the gates', applied to the figures here, not stored flags.
            checks[engine] = {**check.to_dict(), "passed": passes_gate(check),
                              "explanation_passed": explanation_passes(check)}
        files = record.get("files", {})
        if not isinstance(files, dict) or not set(files) <= set(INT8_FILES) or not all(
                isinstance(digest, str) and len(digest) == 64 for digest in files.values()):
            raise ValueError("its file digests")
        return checks, files
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise BundleError(f"{uri}: not an engine record ({error})") from error
