"""Engines against the fp32 reference: bf16 stays close, the gate refuses what does not."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model.inference import ENGINES, check_engine, fastest, make_predictor
from model.network import build_classifier
from model.preprocessing import Preprocessing

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
    bf16 = make_predictor(model, SPEC, "bf16")
    candidate = bf16.predict(images, 8)
    assert candidate.dtype == np.float32 and candidate.shape == reference.shape
    assert np.allclose(candidate.sum(axis=1), 1, atol=1e-5)  # the softmax stays float32
    difference = np.abs(candidate - reference).max()
    assert 0 < difference < 0.02, difference  # bf16 arithmetic really ran, and stayed close
    base = bf16.model.get_layer(index=1)
    assert {layer.compute_dtype for layer in base.layers[1:]} == {"bfloat16"}
    assert {variable.dtype for variable in base.weights} == {"float32"}
    # The model it was made from is untouched.
    assert np.array_equal(make_predictor(model, SPEC, "fp32").predict(images, 8), reference)


def test_unknown_engine_is_refused(model):
    with pytest.raises(ValueError, match="unknown engine 'int4'"):
        make_predictor(model, SPEC, "int4")


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


def test_fastest_times_every_engine_and_takes_the_quickest(model):
    predictors = [make_predictor(model, SPEC, engine) for engine in ENGINES]
    best, speeds = fastest(predictors, batch_size=4, batches=1)
    assert set(speeds) == set(ENGINES) and all(speed > 0 for speed in speeds.values())
    assert speeds[best.engine] == max(speeds.values())
