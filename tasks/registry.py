"""The model store: one folder per version, and ``production.json`` naming the current one.

    <store>/<version>/model.keras, card.json, history.json, curves.png, confusion.png, roc.png
    <store>/production.json

``card.json`` is written last, so a version folder without one is an unfinished upload and is
never loaded or listed.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone

import keras

from model.bundle import BundleError, ModelCard, model_from_bytes
from tasks import storage

__all__ = ["PRODUCTION", "list_versions", "load_card", "load_model", "new_version", "production_version",
           "promotion_decision", "publish", "set_production"]

PRODUCTION = "production.json"
CARD = "card.json"


def new_version() -> str:
    """Sortable by time, unique across concurrent trainings."""
    return datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def publish(store_uri: str, version: str, files: dict[str, bytes], card: ModelCard) -> str:
    """Write a bundle; returns its folder URI. The card goes last and marks it complete."""
    folder = storage.join(store_uri, version)
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    if not storage.create_if_absent(storage.join(folder, CARD), card.to_json()):
        raise BundleError(f"{folder}: version {version} already exists")
    return folder


def list_versions(store_uri: str) -> list[str]:
    cards = storage.list_files(store_uri, {"/" + CARD}, missing_ok=True)
    return sorted(storage.relative_to(uri, store_uri).split("/")[0] for uri in cards)


def production_version(store_uri: str) -> str | None:
    uri = storage.join(store_uri, PRODUCTION)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))["version"]


def set_production(store_uri: str, version: str, reason: str) -> None:
    previous = production_version(store_uri)
    record = {"version": version, "previous": previous, "reason": reason,
              "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_bytes(storage.join(store_uri, PRODUCTION), json.dumps(record, indent=2).encode())


def resolve(store_uri: str, version: str = "production") -> str:
    if version != "production":
        return version
    current = production_version(store_uri)
    if current is None:
        raise BundleError(f"{store_uri}: no production model yet: train one first (cxr-screen train)")
    return current


def load_card(store_uri: str, version: str = "production") -> ModelCard:
    version = resolve(store_uri, version)
    uri = storage.join(store_uri, version, CARD)
    try:
        return ModelCard.from_json(storage.read_bytes(uri))
    except storage.NotFound:
        raise BundleError(f"{uri}: no such model version (known: {', '.join(list_versions(store_uri)) or 'none'})") from None


def load_model(store_uri: str, version: str = "production") -> tuple[keras.Model, ModelCard]:
    """The model and its card; checks the sha256 and the preprocessing, loads in Keras safe mode."""
    card = load_card(store_uri, version)
    data = storage.read_bytes(storage.join(store_uri, card.version, "model.keras"))
    return model_from_bytes(data, card), card


def promotion_decision(new: dict, current: dict | None, force: bool = False) -> tuple[bool, str]:
    """Compare the new and the production model on the same test split.

    ``new`` and ``current`` are ``evaluate(...)['positive']`` dicts, optionally with
    ``within_auc`` (mean within-stratum AUC over the metadata variables) and ``warnings`` (the
    model's own shortcut warnings on this split: within-stratum AUC far below the overall AUC);
    ``current`` is None when there is no production model or it could not be scored on this split.
    A model with such a warning never replaces one without.
    Within-stratum AUC, which shortcut learning cannot inflate, is compared first when both have it.
    """
    if force:
        return True, "promotion forced"
    if current is None:
        return True, "no comparable production model"
    if new.get("warnings") and not current.get("warnings"):
        return False, ("it carries a shortcut warning and production does not (see its card); "
                       "--force-promote overrides")
    key = ["auc", "sensitivity_at_threshold"]
    if new.get("within_auc") is not None and current.get("within_auc") is not None:
        key.insert(0, "within_auc")
    names = {"within_auc": "within-stratum AUC", "auc": "AUC", "sensitivity_at_threshold": "sensitivity at threshold"}
    new_scores = tuple((new.get(k) or 0.0) for k in key)
    old_scores = tuple((current.get(k) or 0.0) for k in key)
    summary = ", ".join(f"{names[k]} {a:.4f} vs {b:.4f}" for k, a, b in zip(key, new_scores, old_scores))
    summary += " (new vs production, same test split)"
    if new_scores > old_scores:
        return True, f"beats production: {summary}"
    return False, f"does not beat production: {summary}"
