"""Which engines may serve a model version, as checked against fp32 on its test split.

    <store>/<version>/engines.json        the checks (model.inference.EngineCheck), bound to the
                                          version's model.keras by its sha256
    <store>/<version>/engines.json.sig    HMAC-SHA256 of engines.json, when CXR_MODEL_SIGNING_KEY is set

The checks live beside the bundle, not in its card: a version published before an engine existed
can be checked later (``cxr-screen validate-engines``) without touching its immutable card. They
are trusted no more than the card: bound to the model's sha256, validated, signature-checked.
A version without valid checks is served by fp32 alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone

from model.bundle import BundleError, ModelCard, sign, signature_matches
from model.inference import ENGINES, GATE, EngineCheck, passes_gate
from tasks import registry, storage

__all__ = ["ENGINES_FILE", "ENGINES_SIGNATURE", "record_checks", "validated_engines"]

ENGINES_FILE = "engines.json"
ENGINES_SIGNATURE = "engines.json.sig"
logger = logging.getLogger(__name__)


def record_checks(store_uri: str, card: ModelCard, checks: Sequence[EngineCheck]) -> str:
    """Write the checks of ``card``'s version; returns the file's URI."""
    folder = storage.join(store_uri, card.version)
    data = json.dumps({"model_version": card.version, "model_sha256": card.model_sha256, "gate": GATE,
                       "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "checks": {check.engine: check.to_dict() for check in checks}}, indent=2, sort_keys=True).encode()
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
        checks = _read_checks(uri, store_uri, card)
    except storage.NotFound:
        return ["fp32"], (f"no engine checks recorded for {card.version}: fp32 only "
                          f"(cxr-screen validate-engines {card.version})")
    except BundleError as error:
        logger.warning("%s; fp32 only", error)
        return ["fp32"], f"{error}: fp32 only"
    passed = ["fp32", *(engine for engine in ENGINES if engine != "fp32" and checks.get(engine, {}).get("passed"))]
    failed = [f"{engine} failed the gate ({EngineCheck(**checks[engine]).summary})"
              for engine in ENGINES if engine in checks and not checks[engine].get("passed")]
    unchecked = [engine for engine in ENGINES if engine != "fp32" and engine not in checks]
    notes = failed + ([f"not checked: {', '.join(unchecked)}"] if unchecked else [])
    return passed, "; ".join(notes)


def _read_checks(uri: str, store_uri: str, card: ModelCard) -> dict[str, dict]:
    data = storage.read_bytes(uri)
    key = registry.signing_key()
    if key is not None:
        try:
            signature = storage.read_bytes(storage.join(store_uri, card.version, ENGINES_SIGNATURE))
        except storage.NotFound:
            raise BundleError(f"{uri}: not signed, and {registry.SIGNING_KEY_VARIABLE} is set") from None
        if not signature_matches(data, signature, key):
            raise BundleError(f"{uri}: its signature does not match")
    try:
        record = json.loads(data)
        if record["model_sha256"] != card.model_sha256 or record["model_version"] != card.version:
            raise BundleError(f"{uri}: checks of another model, not of {card.version}'s model.keras")
        checks = {}
        for engine, fields in record["checks"].items():
            check = EngineCheck(**fields)
            if engine not in ENGINES or check.engine != engine:
                raise ValueError(f"engine {engine!r}")
            # The verdict is the gate's, applied to the figures here, not a stored flag.
            checks[engine] = {**check.to_dict(), "passed": passes_gate(check.flag_agreement, check.auc_difference)}
        return checks
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise BundleError(f"{uri}: not an engine record ({error})") from error
