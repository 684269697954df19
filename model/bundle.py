"""The model bundle's card and the model's bytes: what a version is, and checks on loading.

Pure: bytes in, bytes out. ``store.registry`` puts them in a model store (folder or S3).

Nothing read back from a store is trusted: ``ModelCard.from_json`` checks the card against its
schema, the card's ``files`` manifest holds the sha256 of every other file of the bundle
(``check_file``), and an HMAC of ``card.json`` (``sign``/``check_signature``) ties the card, and
through it every file, to whoever holds the signing key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import keras

from model import stored_json
from model.preprocessing import Preprocessing

__all__ = ["BundleError", "ModelCard", "card_problem", "check_file", "file_digests", "is_safe_name",
           "model_from_bytes", "model_to_bytes", "sign", "signature_matches", "software_versions"]

# Versions, run ids and bundle file names become parts of paths: whatever a stored file says must
# not reach outside its folder. screening/results.py checks run ids with the same rule.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle that must not be used: damaged, tampered with, or built for other code."""


def is_safe_name(name: object) -> bool:
    """Letters, digits, '.', '_' and '-', not starting with a dot, no '..': a single path segment."""
    return isinstance(name, str) and bool(SAFE_NAME.match(name)) and ".." not in name


@dataclass
class ModelCard:
    version: str
    classes: list[str]
    positive_class: str
    threshold: float
    preprocessing: dict
    weights: dict  # origin ('imagenet', 'none' or a URI) and sha256 of the weights file
    dataset: dict  # uri, fingerprint, split seed and fraction, image counts, test-split fingerprint
    metrics: dict  # on the test split, from model.evaluation.evaluate
    training: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    model_sha256: str = ""
    created_at: str = ""
    promotion: dict = field(default_factory=dict)
    # Test-split metrics by metadata stratum, metadata-only baselines, intervals, masked audit and
    # shortcut warnings (model.validity.audit); empty for a dataset without metadata columns.
    validity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # temperature, ECE and Brier before/after
    # The scope gate (model/scope.py, its arrays in scope.npz): pass rate, threshold, false rejection on
    # the test split and rejection per kind of an out-of-scope set, with intervals; empty before it.
    scope: dict = field(default_factory=dict)
    # sha256 of every other file of the bundle, by name (card.json cannot hold its own); empty in
    # bundles written before manifests, where only model.keras is checked (model_sha256).
    files: dict = field(default_factory=dict)

    @property
    def shortcut_warnings(self) -> list[str]:
        return list(self.validity.get("warnings", []))

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["input_size"])

    def to_json(self) -> bytes:
        data = asdict(self)
        data["input_size"] = self.input_size
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "card.json") -> ModelCard:
        """A card checked against the schema (``card_problem``); ``source`` (its URI) starts every
        error. Keeps the fields this code knows: a card written by a newer version still loads here."""
        try:  # bounded: size, depth, integers beyond 2**53, NaN and infinities (model.stored_json)
            values = stored_json.loads(data, source)
        except stored_json.StoredStateError as error:
            raise BundleError(f"{error} (not a model card)") from None
        problem = card_problem(values)
        if problem:
            raise BundleError(f"{source}: {problem}")
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def spec(self) -> Preprocessing:
        """The preprocessing this model was trained with; refuses what this code cannot reproduce."""
        try:
            return Preprocessing.from_dict(self.preprocessing)
        except (TypeError, ValueError) as error:
            raise BundleError(f"model {self.version}: preprocessing {self.preprocessing} is not supported by this code: {error}") from error


_REQUIRED = ("version", "classes", "positive_class", "threshold", "preprocessing", "weights", "dataset", "metrics",
             "model_sha256")
_DICTS = ("preprocessing", "weights", "dataset", "metrics", "training", "software", "promotion", "validity",
          "calibration", "files", "scope")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def card_problem(values: Any) -> str | None:
    """What is wrong with a card's fields (the first thing found), or None.

    Only what this code relies on is checked: screening flags with the threshold and names
    columns after the classes; folders are named after the version and the manifest's files.
    """
    if not isinstance(values, dict):
        return f"not a model card: a JSON object was expected, found {type(values).__name__}"
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        return f"not a model card: {', '.join(missing)} missing"
    for check in (_version_problem, _classes_problem, _threshold_problem, _dicts_problem, _digests_problem):
        problem = check(values)
        if problem:
            return problem
    return None


def _version_problem(values: dict) -> str | None:
    if not is_safe_name(values["version"]):
        return f"version {values['version']!r} is not a safe name (letters, digits, '.', '_', '-'; no '..')"
    created = values.get("created_at", "")
    if not isinstance(created, str) or (created and not _is_iso_time(created)):
        return f"created_at {created!r} is not an ISO 8601 time"
    return None


def _classes_problem(values: dict) -> str | None:
    classes, positive = values["classes"], values["positive_class"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        return f"classes {classes!r} is not a list of two or more non-empty names"
    if len(set(classes)) != len(classes):
        return f"classes {classes!r} names a class twice"
    if not isinstance(positive, str) or positive not in classes:
        return f"positive_class {positive!r} is not one of the classes {classes}"
    return None


def _threshold_problem(values: dict) -> str | None:
    threshold = values["threshold"]
    if not _is_number(threshold):
        return f"threshold {threshold!r} is not a number"
    # A threshold of 0 or 1 or beyond would flag every image or none, silently. Compared before any
    # float conversion: an integer of 400 digits is out of range, not an OverflowError.
    if not (0 < threshold < 1 and math.isfinite(threshold)):
        return f"threshold {threshold!r} is not in (0, 1)"
    return None


def _dicts_problem(values: dict) -> str | None:
    for name in _DICTS:
        if name in values and not isinstance(values[name], dict):
            return f"{name} is {type(values[name]).__name__}, not a JSON object"
    warnings = values.get("validity", {}).get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(line, str) for line in warnings):
        return f"validity.warnings {warnings!r} is not a list of strings"
    return None


def _digests_problem(values: dict) -> str | None:
    if not isinstance(values["model_sha256"], str) or not _SHA256.match(values["model_sha256"]):
        return f"model_sha256 {values['model_sha256']!r} is not a sha256 (64 lowercase hex digits)"
    files = values.get("files", {})
    for name, digest in files.items():
        if not is_safe_name(name) or name == "card.json":
            return f"files: {name!r} is not a bundle file name"
        if not isinstance(digest, str) or not _SHA256.match(digest):
            return f"files: {name}: {digest!r} is not a sha256 (64 lowercase hex digits)"
    if files and files.get("model.keras") != values["model_sha256"]:
        return "files: model.keras does not have the card's model_sha256"
    return None


def _is_iso_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def file_digests(files: dict[str, bytes]) -> dict[str, str]:
    """The manifest of a bundle's files (all but card.json), by name."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def check_file(card: ModelCard, name: str, data: bytes) -> None:
    """Raises BundleError unless ``data`` is the file ``name`` as the card's manifest records it. A
    card from before manifests vouches for model.keras only (its model_sha256)."""
    if card.files:
        expected = card.files.get(name)
    else:
        expected = card.model_sha256 if name == "model.keras" else None
    if expected is None:
        raise BundleError(f"model {card.version}: {name} is not in the card's file manifest")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise BundleError(f"model {card.version}: {name} has sha256 {digest[:12]}..., the card says "
                          f"{expected[:12]}...: the file is damaged or was replaced")


_SIGNATURE_PREFIX = "hmac-sha256:"


def sign(card_json: bytes, key: bytes) -> bytes:
    """The signature of a card's exact bytes; the card's manifest extends it to every file."""
    return (_SIGNATURE_PREFIX + hmac.new(key, card_json, hashlib.sha256).hexdigest() + "\n").encode()


def signature_matches(card_json: bytes, signature: bytes, key: bytes) -> bool:
    return hmac.compare_digest(signature.strip(), sign(card_json, key).strip())


def software_versions() -> dict[str, str]:
    import numpy
    import tensorflow

    return {"python": platform.python_version(), "keras": keras.__version__,
            "tensorflow": tensorflow.__version__, "numpy": numpy.__version__}


def model_to_bytes(model: keras.Model) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def model_from_bytes(data: bytes, card: ModelCard) -> keras.Model:
    """Load with Keras safe mode after checking the bytes against the card's sha256."""
    check_file(card, "model.keras", data)
    spec = card.spec()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        path.write_bytes(data)
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    expected = (None, spec.input_size, spec.input_size, 3)
    if tuple(model.input_shape) != expected or model.output_shape[-1] != len(card.classes):
        raise BundleError(f"model {card.version}: network takes {model.input_shape} and gives "
                          f"{model.output_shape[-1]} classes, the card says {expected} and {card.classes}")
    return model
