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

import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model.defaults import BATCH_SIZE
from model.evaluation import auc, flags
from model.network import LAST_CONVOLUTION
from model.preprocessing import Preprocessing, scale

__all__ = ["ENGINES", "EXPLANATION_GATE", "GATE", "OLD_GATE", "EngineCheck", "FromPixels", "Predictor", "cast_base",
           "check_engine", "choose_feature_base", "explanation_passes", "fastest", "make_predictor", "passes_gate",
           "quantize_int8", "with_base_policy"]

ENGINES = ("fp32", "bf16", "int8")
# A decoding shortcut held to the same gate: large JPEGs decoded at reduced resolution by libjpeg.
REDUCED_DECODE = "reduced-jpeg"
# What the int8 engine is made of, beside the bundle (store/engines.py records their sha256).
INT8_FILES = ("model-int8.xml", "model-int8.bin")
# The gate every engine passes before it serves a version, judged by clinical effect rather than bit
# agreement (rule 2). On the test split, against fp32:
# - the AUC moves by at most 0.005, and no probability by more than 0.10 (about the calibration error
#   of the models this project trains, 0.06-0.10: a change the calibration already blurs);
# - no decision changes far from the threshold: a flip is acceptable only for an image whose fp32
#   probability lies within the engine's measured difference of the threshold, the band: the 99th
#   percentile of |p difference| over the split, at least 0.02 (that close, a probability is
#   clinically the threshold, however precise the engine) and at most 0.05. The cap keeps the band
#   from widening with the damage (six images moved by 0.08 would make 0.08 the 99th percentile);
# - sensitivity and specificity at the threshold move by no more than their noise on this split (the
#   bootstrap standard error of fp32's figure over the test images, and at least one image's share of
#   its class: n images cannot resolve less than 1/n).
# Records made before rule 2 (flags agreeing on 99.5 % of images, AUC within 0.005) keep that verdict.
GATE = {"rule": 2, "max_auc_difference": 0.005, "max_probability_difference": 0.10, "flip_band_quantile": 0.99,
        "min_flip_band": 0.02, "max_flip_band": 0.05,
        "rate_noise": "bootstrap standard error, at least 1/n"}
OLD_GATE = {"min_flag_agreement": 0.995, "max_auc_difference": 0.005}
# Explanations from an engine's own maps serve only when they agree with fp32's Grad-CAM on the test
# split: maps correlated (median Pearson over images, at the maps' resolution), and the share of a
# map's mass in the lungs (the rows' cam_lung_share, at the input's resolution) moved by at most 0.05
# on 95 % of the images (an image whose map is blank under one engine only counts as a change of 1).
EXPLANATION_GATE = {"min_median_correlation": 0.95, "max_lung_share_difference": 0.05, "share_quantile": 0.95}


@dataclass(frozen=True)
class Predictor:
    """Probabilities for resized uint8 images, by one engine; and, from the same forward pass, the
    maps of the last convolution, from which explanations are made with no second pass
    (model.gradcam.cams_from_maps)."""

    engine: str
    spec: Preprocessing
    forward: Callable[[np.ndarray], np.ndarray]  # a uint8 batch to probabilities
    classes: int
    # A uint8 batch to probabilities and last-convolution maps; None where the engine's files predate
    # them (an int8 engine quantised before explanations came from the forward pass). A separate
    # graph: maps are 400 KB an image at 224 px, which plain predictions should not copy out.
    forward_with_maps: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def predict(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        outputs = [np.asarray(self.forward(np.ascontiguousarray(batch, dtype=np.uint8)), dtype=np.float32)
                   for batch in _batches(images, batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, self.classes), np.float32)

    def predict_with_maps(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and last-convolution maps ``(n, h, w, channels)`` float32, or None for the
        maps where the engine cannot give them. Ask batch by batch: maps are large."""
        if self.forward_with_maps is None:
            return self.predict(images, batch_size), None
        probabilities, maps = [], []
        for batch in _batches(images, batch_size):
            probability, found = self.forward_with_maps(np.ascontiguousarray(batch, dtype=np.uint8))
            probabilities.append(np.asarray(probability, dtype=np.float32))
            maps.append(np.asarray(found, dtype=np.float32))
        if not probabilities:
            return np.zeros((0, self.classes), np.float32), None
        return np.concatenate(probabilities), np.concatenate(maps)


def make_predictor(model: keras.Model, spec: Preprocessing, engine: str = "fp32",
                   artifacts: dict[str, bytes] | None = None) -> Predictor:
    """``model`` as trained (float32), run by ``engine``; int8 runs the ``artifacts`` that
    ``quantize_int8`` made from it."""
    classes = int(model.output_shape[-1])
    if engine in ("fp32", "bf16"):
        plain, with_maps = _networks(model, spec, None if engine == "fp32" else "mixed_bfloat16")
        return Predictor(engine, spec, plain.predict_on_batch, classes, with_maps.predict_on_batch)
    if engine == "int8":
        if not artifacts or set(artifacts) != set(INT8_FILES):
            raise ValueError(f"the int8 engine runs {' and '.join(INT8_FILES)}, made by quantize_int8")
        forward, with_maps = _int8_forward(artifacts, model, spec)
        return Predictor("int8", spec, forward, classes, with_maps)
    raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


def _networks(model: keras.Model, spec: Preprocessing, policy: str | None = None) -> tuple[keras.Model, keras.Model]:
    """uint8 pixels to probabilities, and to [probabilities, last-convolution maps (float32)], each
    one compiled graph over the same layers: the model's own, or (``policy``) a copy of its base
    computing under that policy with the head shared. The float32 pair is made once per model and
    spec (compiling VGG16's predict function costs seconds, and training predicts with the same
    model many times; model.network drops it when the head is refitted)."""
    made = getattr(model, "_networks", None)
    if made is None:
        made = {}
        # Kept on the model, so that it goes with the model; set past Keras' attribute tracking,
        # which would make the wrappers a part of the model they wrap.
        object.__setattr__(model, "_networks", made)
    if policy is None and spec in made:
        return made[spec]
    base = model.get_layer("vgg16") if policy is None else cast_base(model.get_layer("vgg16"), policy)
    pixels = keras.Input(model.input_shape[1:], dtype="uint8", name="pixels")
    maps = keras.Model(base.input, base.get_layer(LAST_CONVOLUTION).output)(FromPixels(spec)(pixels))
    probabilities = model.get_layer("head")(base.get_layer("block5_pool")(maps))
    pair = (keras.Model(pixels, probabilities, name=f"{model.name}_pixels"),
            keras.Model(pixels, [probabilities, keras.ops.cast(maps, "float32")], name=f"{model.name}_maps"))
    if policy is None:
        made[spec] = pair
    return pair


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
        # The base up to its last convolution: the engine returns the maps explanations are made from,
        # and pooling runs in float32 with the head.
        base = model.get_layer("vgg16")
        keras.Model(base.input, base.get_layer(LAST_CONVOLUTION).output).export(
            f"{folder}/saved", format="tf_saved_model", verbose=False)
        converted = openvino.convert_model(f"{folder}/saved")
        quantized = nncf.quantize(converted, nncf.Dataset(scaled), subset_size=len(scaled))
        openvino.save_model(quantized, f"{folder}/{INT8_FILES[0]}", compress_to_fp16=False)
        return {name: Path(folder, name).read_bytes() for name in INT8_FILES}


def _int8_forward(artifacts: dict[str, bytes], model: keras.Model, spec: Preprocessing
                  ) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None]:
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
    compiled = core.compile_model(network, "CPU", config)
    base, head = model.get_layer("vgg16"), model.get_layer("head")

    def run(pixels: np.ndarray) -> np.ndarray:
        return compiled(scale(pixels.astype(np.float32) / 255.0, spec))[0]

    # Files quantised before explanations came from the forward pass end at block5's pooling.
    convolution = base.get_layer(LAST_CONVOLUTION).output.shape
    if compiled.outputs[0].get_partial_shape()[1].get_length() != convolution[1]:
        return lambda pixels: head.predict_on_batch(run(pixels)), None
    maps = keras.Input(convolution[1:])
    top = keras.Model(maps, head(base.get_layer("block5_pool")(maps)))

    def with_maps(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = run(pixels)
        return top.predict_on_batch(found), found

    return lambda pixels: with_maps(pixels)[0], with_maps


@dataclass(frozen=True)
class EngineCheck:
    """An engine against fp32 on one model version's test split. The figures after ``passed`` came
    with gate rule 2 and the explanation gate; a record made before them has None there."""

    engine: str
    images: int
    flag_agreement: float  # share of images flagged alike
    max_probability_difference: float  # of the positive class
    auc_difference: float | None  # |AUC(engine) - AUC(fp32)|; None when the split holds one class
    passed: bool
    probability_difference_q99: float | None = None  # the engine's measured difference: the band, up to its cap
    flips: int | None = None  # images flagged differently
    far_flips: int | None = None  # of those, fp32's probability farther from the threshold than GATE's band
    sensitivity_change: float | None = None  # |sensitivity(engine) - sensitivity(fp32)| at the threshold
    sensitivity_noise: float | None = None
    specificity_change: float | None = None
    specificity_noise: float | None = None
    explanation_correlation: float | None = None  # median Pearson correlation with fp32's Grad-CAM
    explanation_lung_share_difference: float | None = None  # the largest, over the images
    explanation_passed: bool | None = None  # None: not checked (the engine gives no maps)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rule(self) -> int:
        return 1 if self.flips is None else 2

    @property
    def summary(self) -> str:
        auc = "n/a" if self.auc_difference is None else f"{self.auc_difference:.4f}"
        line = (f"{self.engine}: flags agree on {self.flag_agreement:.1%} of {self.images} test images, "
                f"max |p difference| {self.max_probability_difference:.4f}, AUC difference {auc}")
        if self.rule == 2:
            line += (f"; {self.flips} flip(s), {self.far_flips} outside the band (99th percentile |p difference| "
                     f"{_shown(self.probability_difference_q99)}, within {GATE['min_flip_band']}-{GATE['max_flip_band']})")
            for name in ("sensitivity", "specificity"):
                change, noise = getattr(self, f"{name}_change"), getattr(self, f"{name}_noise")
                if change is not None:
                    line += f", {name} moved {change:.3f} (noise {_shown(noise, 3)})"
        if self.explanation_passed is not None:
            line += (f"; explanations correlate {_shown(self.explanation_correlation, 3)} with fp32's, lung share "
                     f"within {_shown(self.explanation_lung_share_difference, 3)} on 95 % of images "
                     f"({'pass' if self.explanation_passed else 'fail'})")
        return line


def _shown(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def check_engine(engine: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray,
                 threshold: float, explanations: tuple[np.ndarray, np.ndarray] | None = None,
                 input_size: tuple[int, int] | None = None) -> EngineCheck:
    """Compare positive-class probabilities of ``engine`` (``candidate``) with fp32's (``reference``)
    on the same images; ``labels`` are 1 for the positive class. ``explanations``: fp32's Grad-CAM
    and the engine's, ``(n, h, w)`` each, for the explanation gate; lung shares are measured on them
    resized to ``input_size`` (height, width), as screening's rows measure them."""
    if len(reference) == 0:
        raise ValueError("cannot check an engine on no images")
    reference, candidate = np.asarray(reference, float), np.asarray(candidate, float)
    is_positive = np.asarray(labels).astype(bool)
    reference_flags, candidate_flags = flags(reference, threshold), flags(candidate, threshold)
    agreement = float(np.mean(reference_flags == candidate_flags))
    differences = np.abs(reference - candidate)
    typical = float(np.quantile(differences, GATE["flip_band_quantile"]))
    flipped = reference_flags != candidate_flags
    band = min(max(typical, GATE["min_flip_band"]), GATE["max_flip_band"])
    far = int(np.sum(flipped & (np.abs(reference - threshold) > band)))
    candidate_auc, reference_auc = auc(labels, candidate), auc(labels, reference)  # None with one class
    auc_difference = None if candidate_auc is None else abs(candidate_auc - reference_auc)
    rates = {}
    for name, members in (("sensitivity", is_positive), ("specificity", ~is_positive)):
        if not members.any():
            rates[name] = (None, None)
            continue
        # Sensitivity counts flags among positives; specificity counts non-flags among negatives.
        mine, theirs = (candidate_flags[members], reference_flags[members]) if name == "sensitivity" else (
            ~candidate_flags[members], ~reference_flags[members])
        rates[name] = (round(abs(float(mine.mean()) - float(theirs.mean())), 6), round(_rate_noise(theirs), 6))
    explained = {}
    if explanations is not None:
        explained = _explanation_figures(*explanations, input_size)
    check = EngineCheck(
        engine, len(reference), round(agreement, 6), round(float(differences.max()), 6),
        None if auc_difference is None else round(auc_difference, 6), False, round(typical, 6), int(flipped.sum()), far,
        rates["sensitivity"][0], rates["sensitivity"][1], rates["specificity"][0], rates["specificity"][1], **explained)
    return replace(check, passed=passes_gate(check), explanation_passed=explanation_passes(check))


def _rate_noise(hits: np.ndarray, resamples: int = 1000) -> float:
    """The bootstrap standard error of a rate over these images (a resample's count of hits is
    binomial; seeded, so a record repeats), and never below one image's share: n images cannot resolve
    a change smaller than 1/n."""
    count = len(hits)
    draws = np.random.default_rng(0).binomial(count, float(np.mean(hits)), resamples) / count
    return max(float(draws.std()), 1.0 / count)


def _explanation_figures(reference: np.ndarray, candidate: np.ndarray, size: tuple[int, int] | None) -> dict:
    from model.anatomy import lung_share, resized

    correlations, shares = [], []
    for mine, theirs in zip(np.asarray(candidate, np.float32), np.asarray(reference, np.float32)):
        if mine.std() > 0 and theirs.std() > 0:
            correlations.append(float(np.corrcoef(mine.ravel(), theirs.ravel())[0, 1]))
        else:  # a blank map agrees only with a blank map
            correlations.append(1.0 if mine.std() == theirs.std() == 0 and mine.max() == theirs.max() else 0.0)
        if size is not None:
            mine, theirs = resized(mine, size), resized(theirs, size)
        a, b = lung_share(mine), lung_share(theirs)
        shares.append(0.0 if np.isnan(a) and np.isnan(b) else 1.0 if np.isnan(a) or np.isnan(b) else abs(a - b))
    return {"explanation_correlation": round(float(np.median(correlations)), 6),
            "explanation_lung_share_difference": round(float(np.quantile(shares, EXPLANATION_GATE["share_quantile"])), 6)}


def _figure(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def explanation_passes(check: EngineCheck) -> bool | None:
    """The explanation gate's verdict on a check's figures; None where explanations were not checked."""
    if check.explanation_correlation is None or check.explanation_lung_share_difference is None:
        return None
    return (_figure(check.explanation_correlation) and _figure(check.explanation_lung_share_difference)
            and check.explanation_correlation >= EXPLANATION_GATE["min_median_correlation"]
            and check.explanation_lung_share_difference <= EXPLANATION_GATE["max_lung_share_difference"])


def passes_gate(check: EngineCheck) -> bool:
    """The gate's verdict on a check's figures (rule 2; rule 1 for a record made before it)."""
    auc_ok = check.auc_difference is None or (_figure(check.auc_difference)
                                              and 0 <= check.auc_difference <= GATE["max_auc_difference"])
    if check.rule == 1:
        return _figure(check.flag_agreement) and check.flag_agreement >= OLD_GATE["min_flag_agreement"] and auc_ok
    rates_ok = all(
        change is None or (_figure(change) and _figure(noise) and change <= noise + 1e-9)
        for change, noise in ((check.sensitivity_change, check.sensitivity_noise),
                              (check.specificity_change, check.specificity_noise)))
    return (auc_ok and rates_ok and _figure(check.max_probability_difference)
            and check.max_probability_difference <= GATE["max_probability_difference"]
            and isinstance(check.far_flips, int) and not isinstance(check.far_flips, bool) and check.far_flips == 0)


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
