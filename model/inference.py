"""Engines: one trained model, several ways to run its forward pass, each held to the fp32 reference.

``fp32`` is the reference. ``bf16`` runs the VGG16 base under Keras' ``mixed_bfloat16`` policy
(bf16 matrix units: oneDNN with AMX or AVX512-BF16 on CPUs, tensor cores on GPUs) and keeps the
head, whose standardisation and softmax are cheap and sensitive, in float32. ``int8`` is the
model quantised after training by NNCF (weights and activations, calibrated on training images)
and run by OpenVINO, whose int8 kernels use VNNI or AMX where the CPU has them. OpenVINO was
chosen over TensorFlow Lite because it is maintained for x86 servers and measured far faster here
(TFLite int8 gained 1.4x on an AVX2 EPYC; OpenVINO int8 gains about 15x on AMX). Where the
hardware lacks the units an engine needs, it is emulated and slower: ``fastest`` measures, it
never assumes.

An engine may serve a model version only after ``check_engine`` found it agreeing with fp32 on
that version's test split (``GATE``); the result is recorded with the bundle.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model.defaults import BATCH_SIZE
from model.evaluation import auc, flags
from model.preprocessing import Preprocessing, scale

__all__ = ["ENGINES", "GATE", "EngineCheck", "FromPixels", "Predictor", "cast_base", "check_engine", "choose_feature_base", "fastest",
           "make_predictor", "passes_gate", "quantize_int8", "taking_pixels", "with_base_policy"]

ENGINES = ("fp32", "bf16", "int8")
# A decoding shortcut held to the same gate: large JPEGs decoded at reduced resolution by libjpeg.
REDUCED_DECODE = "reduced-jpeg"
# What the int8 engine is made of, beside the bundle (store/engines.py records their sha256).
INT8_FILES = ("model-int8.xml", "model-int8.bin")
# The gate every engine passes before it serves a version: flags agree on at least 99.5 % of the
# test images, and the AUC moves by at most 0.005.
GATE = {"min_flag_agreement": 0.995, "max_auc_difference": 0.005}


@dataclass(frozen=True)
class Predictor:
    """Probabilities for resized uint8 images, by one engine."""

    engine: str
    spec: Preprocessing
    forward: Callable[[np.ndarray], np.ndarray]  # a uint8 batch to probabilities
    classes: int

    def predict(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        outputs = [np.asarray(self.forward(np.ascontiguousarray(batch, dtype=np.uint8)), dtype=np.float32)
                   for batch in _batches(images, batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, self.classes), np.float32)


def make_predictor(model: keras.Model, spec: Preprocessing, engine: str = "fp32",
                   artifacts: dict[str, bytes] | None = None) -> Predictor:
    """``model`` as trained (float32), run by ``engine``; int8 runs the ``artifacts`` that
    ``quantize_int8`` made from it."""
    classes = int(model.output_shape[-1])
    if engine == "fp32":
        return Predictor("fp32", spec, taking_pixels(model, spec).predict_on_batch, classes)
    if engine == "bf16":
        return Predictor("bf16", spec, taking_pixels(with_base_policy(model, "mixed_bfloat16"), spec).predict_on_batch,
                         classes)
    if engine == "int8":
        if not artifacts or set(artifacts) != set(INT8_FILES):
            raise ValueError(f"the int8 engine runs {' and '.join(INT8_FILES)}, made by quantize_int8")
        return Predictor("int8", spec, _int8_forward(artifacts, model.get_layer("head"), spec), classes)
    raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


class FromPixels(keras.layers.Layer):
    """uint8 pixels to the network's input, inside the compiled graph: on a GPU the host moves a
    quarter of the bytes and no longer converts every pixel on one core, which held predictions to
    a third of the forward pass's speed (bench/gpu_bench.py). The same arithmetic as
    ``model.preprocessing.preprocess``: a division by 255, not a multiplication by its inverse."""

    def __init__(self, spec: Preprocessing, **kwargs) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.spec = spec

    def call(self, pixels):
        return scale(keras.ops.cast(pixels, "float32") / 255.0, self.spec)


def taking_pixels(model: keras.Model, spec: Preprocessing) -> keras.Model:
    """``model`` (which takes scaled float32 images) taking uint8 pixels; the layers are shared.
    One per model and spec: each new wrapper would compile its predict function again (seconds for
    VGG16), and training predicts with the same model many times."""
    made = getattr(model, "_taking_pixels", None)
    if made is None:
        made = {}
        # Kept on the model, so that it goes with the model; set past Keras' attribute tracking,
        # which would make the wrapper a part of the model it wraps.
        object.__setattr__(model, "_taking_pixels", made)
    if spec not in made:
        pixels = keras.Input(model.input_shape[1:], dtype="uint8", name="pixels")
        made[spec] = keras.Model(pixels, model(FromPixels(spec)(pixels)), name=f"{model.name}_pixels")
    return made[spec]


def with_base_policy(model: keras.Model, policy: str) -> keras.Model:
    """The classifier with its VGG16 base computing under ``policy``; weights copied."""
    image = keras.Input(model.input_shape[1:], name="image")
    head = model.get_layer("head")
    return keras.Model(image, head(cast_base(model.get_layer("vgg16"), policy)(image)), name=f"{model.name}_{policy}")


def cast_base(base: keras.Model, policy: str) -> keras.Model:
    """A copy of the VGG16 base computing under ``policy`` (its variables stay float32)."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = keras.DTypePolicy(policy)
        return layer.__class__.from_config(config)

    cast = keras.models.clone_model(base, clone_function=clone)
    cast.set_weights(base.get_weights())
    return cast


# Stage 1's features by bf16 may differ from fp32's by this much (median relative L2 distance of the
# pooled feature vectors); bf16 keeps 8 bits of mantissa, and VGG16's pooled features measure ~0.5 %.
FEATURE_TOLERANCE = 0.02


def choose_feature_base(base: keras.Model, images: np.ndarray, spec: Preprocessing) -> tuple[keras.Model, dict]:
    """The frozen base that computes stage 1's features: bf16 where its pooled features agree with
    fp32's on ``images`` (a batch of training images) within ``FEATURE_TOLERANCE`` and it is faster
    here; fp32 otherwise. Returns the base and what was measured (for the card)."""
    batch = scale(np.asarray(images, np.float32) / 255.0, spec)
    candidates = {"fp32": base, "bf16": cast_base(base, "mixed_bfloat16")}
    features, speeds = {}, {}
    for engine, candidate in candidates.items():
        candidate.predict_on_batch(batch)  # warm-up: compiles, and oneDNN picks its kernels
        started = time.perf_counter()
        output = np.asarray(candidate.predict_on_batch(batch), dtype=np.float32)
        speeds[engine] = round(len(batch) / (time.perf_counter() - started), 2)
        features[engine] = output.mean(axis=(1, 2))
    distance = np.linalg.norm(features["bf16"] - features["fp32"], axis=1)
    relative = float(np.median(distance / np.maximum(np.linalg.norm(features["fp32"], axis=1), 1e-12)))
    agrees = relative <= FEATURE_TOLERANCE
    engine = "bf16" if agrees and speeds["bf16"] > speeds["fp32"] else "fp32"
    report = {"engine": engine, "images_per_second": speeds, "bf16_median_relative_difference": round(relative, 6),
              "tolerance": FEATURE_TOLERANCE}
    return candidates[engine], report


def _openvino():
    # OpenVINO and NNCF send usage data to Google Analytics unless a consent file in the user's home
    # says no. A screening tool in a hospital sends nothing: with their telemetry package
    # unimportable, both fall back to their own no-op stubs.
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    import openvino

    return openvino


def quantize_int8(model: keras.Model, spec: Preprocessing, calibration: np.ndarray) -> dict[str, bytes]:
    """``model``'s VGG16 base with int8 weights and activations (NNCF post-training quantisation,
    its ranges calibrated on ``calibration``: resized uint8 training images), as OpenVINO IR files.
    The head stays the Keras float32 one: it costs nothing, and its standardisation divides by
    per-channel spreads that int8 rounding would not survive."""
    openvino = _openvino()
    import nncf

    scaled = [np.ascontiguousarray(scale(image[None].astype(np.float32) / 255.0, spec)) for image in calibration]
    with tempfile.TemporaryDirectory() as folder:
        model.get_layer("vgg16").export(f"{folder}/saved", format="tf_saved_model", verbose=False)
        converted = openvino.convert_model(f"{folder}/saved")
        quantized = nncf.quantize(converted, nncf.Dataset(scaled), subset_size=len(scaled))
        openvino.save_model(quantized, f"{folder}/{INT8_FILES[0]}", compress_to_fp16=False)
        return {name: Path(folder, name).read_bytes() for name in INT8_FILES}


def _int8_forward(artifacts: dict[str, bytes], head: keras.Model, spec: Preprocessing
                  ) -> Callable[[np.ndarray], np.ndarray]:
    openvino = _openvino()
    core = openvino.Core()
    weights = openvino.Tensor(np.frombuffer(artifacts[INT8_FILES[1]], np.uint8))
    network = core.read_model(model=artifacts[INT8_FILES[0]].decode(), weights=weights)
    # Layers left in floating point stay float32: int8 is the one approximation this engine makes.
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    # One thread budget per process: where TensorFlow's is set (a Dask worker sharing the machine's
    # cores with others, flows/fan_out.py), OpenVINO keeps to it rather than taking every core.
    if (threads := tf.config.threading.get_intra_op_parallelism_threads()) > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    base = core.compile_model(network, "CPU", config)
    return lambda pixels: head.predict_on_batch(base(scale(pixels.astype(np.float32) / 255.0, spec))[0])


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
    if len(reference) == 0:
        raise ValueError("cannot check an engine on no images")
    agreement = float(np.mean(flags(reference, threshold) == flags(candidate, threshold)))
    difference = float(np.max(np.abs(reference - candidate)))
    candidate_auc, reference_auc = auc(labels, candidate), auc(labels, reference)  # None with one class
    auc_difference = None if candidate_auc is None else abs(candidate_auc - reference_auc)
    agreement, auc_difference = round(agreement, 6), None if auc_difference is None else round(auc_difference, 6)
    return EngineCheck(engine, len(reference), agreement, round(difference, 6), auc_difference,
                       passes_gate(agreement, auc_difference))


def passes_gate(flag_agreement: float, auc_difference: float | None) -> bool:
    return (isinstance(flag_agreement, (int, float)) and flag_agreement >= GATE["min_flag_agreement"]
            and (auc_difference is None or (isinstance(auc_difference, (int, float))
                                            and 0 <= auc_difference <= GATE["max_auc_difference"])))


def fastest(predictors: Sequence[Predictor], batch_size: int = BATCH_SIZE, batches: int = 2) -> tuple[Predictor, dict[str, float]]:
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
