"""Engines against the fp32 reference: bf16 and int8 stay close, the gate refuses what does not."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model.inference import (
    ENGINES,
    INT8_FILES,
    FromPixels,
    check_engine,
    fastest,
    make_predictor,
    quantize_int8,
    with_base_policy,
)
from model.network import build_classifier
from model.preprocessing import Preprocessing, preprocess

SPEC = Preprocessing(input_size=64)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(2, 64, None, head="linear")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)


def test_bf16_runs_the_base_in_bf16_and_stays_close_to_fp32(model, images):
    reference = make_predictor(model, SPEC, "fp32").predict(images, 8)
    candidate = make_predictor(model, SPEC, "bf16").predict(images, 8)
    assert candidate.dtype == np.float32 and candidate.shape == reference.shape
    assert np.allclose(candidate.sum(axis=1), 1, atol=1e-5)  # the softmax stays float32
    difference = np.abs(candidate - reference).max()
    assert 0 < difference < 0.02, difference  # bf16 arithmetic really ran, and stayed close
    base = with_base_policy(model, "mixed_bfloat16").get_layer(index=1)
    assert {layer.compute_dtype for layer in base.layers[1:]} == {"bfloat16"}
    assert {variable.dtype for variable in base.weights} == {"float32"}
    # The model it was made from is untouched.
    assert np.array_equal(make_predictor(model, SPEC, "fp32").predict(images, 8), reference)


@pytest.mark.parametrize("scale_mode", ["unit", "caffe"])
def test_predictors_take_pixels_and_convert_them_as_preprocessing_does(model, images, scale_mode):
    # uint8 in, converted inside the graph (a quarter of the bytes to a GPU): exactly the float32
    # inputs the network was trained on; the outputs differ only by the compiled graph's rounding.
    spec = Preprocessing(input_size=64, scale_mode=scale_mode)
    on_host = np.stack([preprocess(image, spec) for image in images])
    assert np.array_equal(np.asarray(FromPixels(spec)(images)), on_host)
    predictor = make_predictor(model, spec, "fp32")
    assert predictor.forward.__self__.input.dtype == "uint8"
    if scale_mode == "unit":  # caffe inputs saturate this random base's softmax: nothing to compare
        assert np.allclose(predictor.predict(images, 8), model.predict_on_batch(on_host), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def int8(model, images) -> dict[str, bytes]:
    return quantize_int8(model, SPEC, images[:16])


def test_int8_is_quantised_from_training_images_and_stays_close_to_fp32(model, images, int8):
    assert set(int8) == set(INT8_FILES)
    assert b"FakeQuantize" in int8["model-int8.xml"] or b'element_type="i8"' in int8["model-int8.xml"]
    reference = make_predictor(model, SPEC, "fp32").predict(images, 8)
    candidate = make_predictor(model, SPEC, "int8", int8).predict(images, 8)
    assert candidate.shape == reference.shape and np.allclose(candidate.sum(axis=1), 1, atol=1e-4)
    assert 0 < np.abs(candidate - reference).max() < 0.05
    assert make_predictor(model, SPEC, "int8", int8).predict(images[:0]).shape == (0, 2)


def test_unknown_engine_and_missing_artifacts_are_refused(model):
    with pytest.raises(ValueError, match="unknown engine 'int4'"):
        make_predictor(model, SPEC, "int4")
    with pytest.raises(ValueError, match="made by quantize_int8"):
        make_predictor(model, SPEC, "int8")


def test_gate_passes_agreement_and_refuses_flips_and_auc_drift():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)
    reference = np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1)
    same = check_engine("bf16", reference, reference + 1e-4, labels, 0.5)
    assert same.passed and same.flag_agreement == 1.0 and same.auc_difference < 1e-3
    flipped = reference.copy()
    near = np.argsort(np.abs(reference - 0.5))[:4]  # 1 % of flags flip: under 99.5 % agreement
    flipped[near] = np.where(reference[near] >= 0.5, 0.49, 0.51)
    assert not check_engine("bf16", reference, flipped, labels, 0.5).passed
    drift = reference.copy()  # same flags, positives' ranks squeezed
    drift[labels == 1] = np.where(reference[labels == 1] >= 0.5, 0.5 + (reference[labels == 1] - 0.5) * 0.01, 0.0)
    check = check_engine("bf16", reference, drift, labels, 0.5)
    assert check.flag_agreement == 1.0 and check.auc_difference > 0.005 and not check.passed
    one_class = check_engine("bf16", reference, reference, np.zeros(400, int), 0.5)
    assert one_class.auc_difference is None and one_class.passed


def test_fastest_times_every_engine_and_takes_the_quickest(model, int8):
    predictors = [make_predictor(model, SPEC, engine, int8 if engine == "int8" else None) for engine in ENGINES]
    best, speeds = fastest(predictors, batch_size=4, batches=1)
    assert set(speeds) == set(ENGINES) and all(speed > 0 for speed in speeds.values())
    assert speeds[best.engine] == max(speeds.values())


def test_openvino_and_nncf_send_no_telemetry():
    """Outside pytest (NNCF silences itself under pytest), in a fresh process, as the CLI runs."""
    import subprocess
    import sys

    code = ("import model.inference as inference; inference._openvino(); import nncf, nncf.telemetry.wrapper as w; "
            "import openvino.tools.ovc.telemetry_utils as t; "
            "print(isinstance(w.telemetry, w.NNCFTelemetryStub), t.tm.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "openvino.tools.ovc.telemetry_stub"]  # both use their no-op stubs


def test_stage_one_features_use_bf16_only_where_it_agrees_and_is_faster(model, images, monkeypatch):
    import model.inference as inference

    base = model.get_layer("vgg16")
    chosen, report = inference.choose_feature_base(base, images[:8], SPEC)
    speeds = report["images_per_second"]
    assert 0 < report["bf16_median_relative_difference"] < inference.FEATURE_TOLERANCE
    assert report["engine"] == ("bf16" if speeds["bf16"] > speeds["fp32"] else "fp32")
    assert (chosen is base) == (report["engine"] == "fp32")
    monkeypatch.setattr(inference, "FEATURE_TOLERANCE", 0.0)  # nothing agrees exactly: fp32 it is
    chosen, report = inference.choose_feature_base(base, images[:8], SPEC)
    assert report["engine"] == "fp32" and chosen is base
