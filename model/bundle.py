"""The model bundle's card and the model's bytes: what a version is, and checks on loading.

Pure: bytes in, bytes out. ``tasks.registry`` puts them in a model store (folder or S3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from model.preprocessing import Preprocessing

__all__ = ["BundleError", "ModelCard", "model_from_bytes", "model_to_bytes", "software_versions"]


class BundleError(ValueError):
    """A bundle that must not be used: damaged, or built for other code."""


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
    def from_json(cls, data: bytes | str) -> ModelCard:
        """Keeps the fields this code knows: a card written by a newer version still loads here."""
        try:
            values = json.loads(data)
            known = {item.name for item in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (ValueError, TypeError, AttributeError) as error:
            raise BundleError(f"not a model card: {error}") from error

    def spec(self) -> Preprocessing:
        """The preprocessing this model was trained with; refuses what this code cannot reproduce."""
        try:
            return Preprocessing.from_dict(self.preprocessing)
        except (TypeError, ValueError) as error:
            raise BundleError(f"model {self.version}: preprocessing {self.preprocessing} is not supported by this code: {error}") from error


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
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.model_sha256:
        raise BundleError(f"model {card.version}: model.keras has sha256 {digest[:12]}..., the card says "
                          f"{card.model_sha256[:12]}...: the file is damaged or was replaced")
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
