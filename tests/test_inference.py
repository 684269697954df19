"""Engines against the fp32 reference: bf16 and int8 stay close, the gate refuses what does not."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model.inference import (
    ENGINES,
    GATE,
    INT8_FILES,
    OLD_GATE,
    EngineCheck,
    FromPixels,
    check_engine,
    fastest,
    make_predictor,
    passes_gate,
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


def test_every_engine_returns_the_maps_of_its_own_forward_pass(model, images, int8):
    """Probabilities and block5_conv3's maps come from one pass: fp32's maps are the base's own,
    bf16's and int8's close to them; asking for maps changes no probability."""
    base = model.get_layer("vgg16")
    convolution = keras.Model(base.input, base.get_layer("block5_conv3").output)
    expected = np.asarray(convolution(np.stack([preprocess(image, SPEC) for image in images])))
    for engine in ENGINES:
        predictor = make_predictor(model, SPEC, engine, int8 if engine == "int8" else None)
        probabilities, maps = predictor.predict_with_maps(images, 8)
        assert maps.shape == expected.shape and maps.dtype == np.float32, engine
        assert np.array_equal(probabilities, predictor.predict(images, 8)), engine
        correlation = np.corrcoef(maps.ravel(), expected.ravel())[0, 1]
        assert correlation > (0.99999 if engine == "fp32" else 0.98), (engine, correlation)


def test_int8_files_made_before_maps_still_predict_and_say_they_give_none(model, images, tmp_path):
    """An int8 engine quantised by an earlier version ends at block5's pooling: it serves as before,
    and explanations come from elsewhere."""
    import openvino

    model.get_layer("vgg16").export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    openvino.save_model(openvino.convert_model(str(tmp_path / "saved")), str(tmp_path / INT8_FILES[0]), compress_to_fp16=False)
    files = {name: (tmp_path / name).read_bytes() for name in INT8_FILES}
    probabilities, maps = make_predictor(model, SPEC, "int8", files).predict_with_maps(images, 8)
    assert maps is None
    assert np.allclose(probabilities, make_predictor(model, SPEC, "fp32").predict(images, 8), atol=1e-4)


def test_a_refitted_head_is_served_by_new_graphs(images):
    """The standardiser's statistics are constants in a traced graph: refitting the linear head after
    predicting must not leave the old graphs serving (predictions, and Grad-CAM from maps)."""
    from model.gradcam import cams_from_maps
    from model.network import set_linear_head

    keras.utils.set_random_seed(1)
    model = build_classifier(2, 64, None, head="linear", seed=1)
    rng = np.random.default_rng(1)
    set_linear_head(model, np.zeros(512), np.ones(512), rng.normal(0, 0.3, (512, 2)), np.zeros(2))
    before, maps = make_predictor(model, SPEC, "fp32").predict_with_maps(images[:4], 4)
    cams_before = cams_from_maps(model, maps, 1)[0]
    mean = maps.mean(axis=(0, 1, 2))
    set_linear_head(model, mean, np.full(512, 4.0), rng.normal(0, 0.3, (512, 2)), np.zeros(2))
    after = make_predictor(model, SPEC, "fp32").predict(images[:4], 4)
    on_floats = model.predict_on_batch(np.stack([preprocess(image, SPEC) for image in images[:4]]))
    assert not np.allclose(after, before) and np.allclose(after, on_floats, atol=1e-5)
    assert not np.allclose(cams_from_maps(model, maps, 1)[0], cams_before)


def test_unknown_engine_and_missing_artifacts_are_refused(model):
    with pytest.raises(ValueError, match="unknown engine 'int4'"):
        make_predictor(model, SPEC, "int4")
    with pytest.raises(ValueError, match="made by quantize_int8"):
        make_predictor(model, SPEC, "int8")


def _scores(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], 200)
    return labels, np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1)


def test_gate_allows_flips_that_precision_explains_near_the_threshold():
    """Rule 2 judges flips by where they happen: engine noise of a few thousandths everywhere flips
    the images that sit that close to the threshold, which the old rule (99.5 % agreement) refused."""
    labels, reference = _scores()
    same = check_engine("bf16", reference, reference + 1e-4, labels, 0.5)
    assert same.passed and same.flag_agreement == 1.0 and same.flips == 0 and same.auc_difference < 1e-3
    noisy = reference + np.random.default_rng(2).normal(0, 0.004, len(reference))
    near = np.argsort(np.abs(reference - 0.5))[:4]
    noisy[near] = np.where(reference[near] >= 0.5, reference[near] - 0.009, reference[near] + 0.009)
    check = check_engine("bf16", reference, noisy, labels, 0.5)
    assert check.flips >= 4 and check.far_flips == 0 and check.flag_agreement < OLD_GATE["min_flag_agreement"]
    assert check.passed and check.rule == 2
    assert not passes_gate(EngineCheck("bf16", 400, check.flag_agreement, 0.01, 0.001, True))  # rule 1 refused it


def test_gate_refuses_decisions_changed_far_from_the_threshold_and_large_differences():
    labels, reference = _scores()
    far = reference + np.random.default_rng(2).normal(0, 0.002, len(reference))
    one = int(np.argmin(np.abs(reference - 0.58)))  # 0.08 above the threshold, far outside the noise band
    far[one] = 0.49
    check = check_engine("bf16", reference, far, labels, 0.5)
    assert check.far_flips == 1 and check.max_probability_difference < GATE["max_probability_difference"]
    assert not check.passed
    large = reference.copy()
    unflagged = int(np.argmin(reference))
    large[unflagged] += 0.2  # no flip, but a probability moved twice the bound
    check = check_engine("int8", reference, large, labels, 0.5)
    assert check.flips == 0 and check.max_probability_difference > 0.1 and not check.passed


def test_gate_band_does_not_widen_with_the_damage():
    """Six negatives pushed up by 0.08 change decisions up to 0.07 from the threshold: the 99th
    percentile of the engine's own differences calls that typical; the band's cap (0.05) refuses it,
    as it refuses one image moved so."""
    labels, reference = _scores()
    pushed = reference + np.random.default_rng(2).normal(0, 0.002, len(reference))
    below = np.flatnonzero((labels == 0) & (reference < 0.5) & (reference > 0.43))[:6]
    assert (reference[below] < 0.45).any()  # at least one decision changes more than 0.05 from the threshold
    pushed[below] = reference[below] + 0.08
    check = check_engine("int8", reference, pushed, labels, 0.5)
    assert check.flips >= 6 and check.far_flips >= 1 and check.max_probability_difference < 0.1
    assert check.probability_difference_q99 > 0.07 and not check.passed, check.summary


def test_gate_refuses_a_sensitivity_shift_beyond_its_noise_and_auc_drift():
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 200)
    reference = np.concatenate([rng.uniform(0, 0.48, 200), rng.uniform(0.5, 0.52, 30), rng.uniform(0.55, 1, 170)])
    shifted = reference.copy()
    shifted[200:230] -= 0.025  # 30 positives just above the threshold drop below it: each flip is near
    check = check_engine("int8", reference, shifted, labels, 0.5)
    assert check.far_flips == 0 and check.sensitivity_change > check.sensitivity_noise
    assert not check.passed
    labels, reference = _scores()
    drift = reference.copy()  # same flags, positives' ranks squeezed
    drift[labels == 1] = np.where(reference[labels == 1] >= 0.5, 0.5 + (reference[labels == 1] - 0.5) * 0.01, 0.0)
    check = check_engine("bf16", reference, drift, labels, 0.5)
    assert check.flag_agreement == 1.0 and check.auc_difference > 0.005 and not check.passed
    one_class = check_engine("bf16", reference, reference, np.zeros(400, int), 0.5)
    assert one_class.auc_difference is None and one_class.sensitivity_change is None and one_class.passed


def test_a_deliberately_broken_engine_is_refused(model, images):
    """A copy of the model with one block5 kernel perturbed by 20 %, run as an engine: refused."""
    broken = keras.models.clone_model(model)
    broken.set_weights(model.get_weights())
    kernel = broken.get_layer("vgg16").get_layer("block5_conv2").kernel
    kernel.assign(kernel * (1 + 0.2 * np.random.default_rng(0).standard_normal(kernel.shape).astype("float32")))
    reference = make_predictor(model, SPEC, "fp32").predict(images, 8)[:, 1]
    labels = (reference >= np.median(reference)).astype(int)
    threshold = float(np.median(reference))
    healthy = check_engine("bf16", reference, make_predictor(model, SPEC, "bf16").predict(images, 8)[:, 1], labels,
                           threshold)
    assert healthy.passed, healthy.summary  # the same gate passes the engine unbroken
    check = check_engine("bf16", reference, make_predictor(broken, SPEC, "bf16").predict(images, 8)[:, 1], labels,
                         threshold)
    assert not check.passed, check.summary


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
    from model import inference

    base = model.get_layer("vgg16")
    chosen, report = inference.choose_feature_base(base, images[:8], SPEC)
    speeds = report["images_per_second"]
    assert 0 < report["bf16_median_relative_difference"] < inference.FEATURE_TOLERANCE
    assert report["engine"] == ("bf16" if speeds["bf16"] > speeds["fp32"] else "fp32")
    assert (chosen is base) == (report["engine"] == "fp32")
    monkeypatch.setattr(inference, "FEATURE_TOLERANCE", 0.0)  # nothing agrees exactly: fp32 it is
    chosen, report = inference.choose_feature_base(base, images[:8], SPEC)
    assert report["engine"] == "fp32" and chosen is base
