"""Engines: one trained model, several ways to run its forward pass, each held to the fp32 reference.

``fp32`` is the reference. ``bf16`` runs the VGG16 base under Keras' ``mixed_bfloat16`` policy
(bf16 matrix units: oneDNN with AMX or AVX512-BF16 on CPUs, tensor cores on GPUs) and keeps the
head, whose standardisation and softmax are cheap and sensitive, in float32. Where the hardware
has no bf16 units, bf16 is emulated and slower: ``fastest`` measures, it never assumes.

An engine may serve a model version only after ``check_engine`` found it agreeing with fp32 on
that version's test split (``GATE``); the result is recorded with the bundle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import keras
import numpy as np

from model.preprocessing import Preprocessing, scale

__all__ = ["ENGINES", "GATE", "EngineCheck", "Predictor", "check_engine", "fastest", "make_predictor", "passes_gate"]

ENGINES = ("fp32", "bf16")
# The gate every engine passes before it serves a version: flags agree on at least 99.5 % of the
# test images, and the AUC moves by at most 0.005.
GATE = {"min_flag_agreement": 0.995, "max_auc_difference": 0.005}


@dataclass(frozen=True)
class Predictor:
    """Probabilities for resized uint8 images, by one engine."""

    engine: str
    model: keras.Model
    spec: Preprocessing

    def predict(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        outputs = [np.asarray(self.model.predict_on_batch(scale(batch.astype(np.float32) / 255.0, self.spec)),
                              dtype=np.float32)
                   for batch in _batches(images, batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, self.model.output.shape[-1]), np.float32)


def make_predictor(model: keras.Model, spec: Preprocessing, engine: str = "fp32") -> Predictor:
    """``model`` as trained (float32), run by ``engine``."""
    if engine == "fp32":
        return Predictor("fp32", model, spec)
    if engine == "bf16":
        return Predictor("bf16", _with_base_policy(model, "mixed_bfloat16"), spec)
    raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


def _with_base_policy(model: keras.Model, policy: str) -> keras.Model:
    base, head = model.get_layer("vgg16"), model.get_layer("head")

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = keras.DTypePolicy(policy)
        return layer.__class__.from_config(config)

    cast = keras.models.clone_model(base, clone_function=clone)
    cast.set_weights(base.get_weights())  # variables stay float32; only the arithmetic is bf16
    image = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(image, head(cast(image)), name=f"{model.name}_{policy}")


@dataclass(frozen=True)
class EngineCheck:
    """An engine against fp32 on one model version's test split."""

    engine: str
    images: int
    flag_agreement: float  # share of images flagged alike
    max_probability_difference: float  # of the positive class
    auc_difference: float | None  # |AUC(engine) - AUC(fp32)|; None when the split holds one class
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def summary(self) -> str:
        auc = "n/a" if self.auc_difference is None else f"{self.auc_difference:.4f}"
        return (f"{self.engine}: flags agree on {self.flag_agreement:.1%} of {self.images} test images, "
                f"max |p difference| {self.max_probability_difference:.4f}, AUC difference {auc}")


def check_engine(engine: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray,
                 threshold: float) -> EngineCheck:
    """Compare positive-class probabilities of ``engine`` (``candidate``) with fp32's (``reference``)
    on the same images; ``labels`` are 1 for the positive class."""
    from sklearn.metrics import roc_auc_score

    if len(reference) == 0:
        raise ValueError("cannot check an engine on no images")
    agreement = float(np.mean((reference >= threshold) == (candidate >= threshold)))
    difference = float(np.max(np.abs(reference - candidate)))
    auc = None
    if 0 < labels.sum() < len(labels):
        auc = abs(float(roc_auc_score(labels, candidate)) - float(roc_auc_score(labels, reference)))
    agreement, auc = round(agreement, 6), None if auc is None else round(auc, 6)
    return EngineCheck(engine, len(reference), agreement, round(difference, 6), auc, passes_gate(agreement, auc))


def passes_gate(flag_agreement: float, auc_difference: float | None) -> bool:
    return (isinstance(flag_agreement, (int, float)) and flag_agreement >= GATE["min_flag_agreement"]
            and (auc_difference is None or (isinstance(auc_difference, (int, float))
                                            and 0 <= auc_difference <= GATE["max_auc_difference"])))


def fastest(predictors: Sequence[Predictor], batch_size: int = 16, batches: int = 2) -> tuple[Predictor, dict[str, float]]:
    """The predictor with the most images per second here and now, timed on ``batches`` batches
    after one warm-up batch (which also compiles its graph), and every engine's figure."""
    rng = np.random.default_rng(0)
    size = predictors[0].spec.input_size
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    speeds = {}
    for predictor in predictors:
        predictor.predict(images, batch_size)
        started = time.perf_counter()
        for _ in range(batches):
            predictor.predict(images, batch_size)
        speeds[predictor.engine] = round(batches * batch_size / (time.perf_counter() - started), 2)
    best = max(predictors, key=lambda predictor: speeds[predictor.engine])
    return best, speeds


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]
