"""model/gradcam.py and model/anatomy.py: Grad-CAM on a classifier whose answer is known by
construction, Grad-CAM following opacities on a trained one, the lung prior, one-sided phantoms."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest

from model.anatomy import LUNG_BOXES, lung_mask, lung_share, mask_images
from model.gradcam import cams_from_maps, grad_cam, grad_cam_and_probabilities, overlay
from model.inference import ENGINES, check_engine, make_predictor, quantize_int8
from model.network import build_classifier, set_linear_head, unfreeze_top_block
from model.preprocessing import Preprocessing, resize, scale
from model.training import predict_probabilities
from store.phantoms import MARKER_BOX, chest_phantom

# --- Grad-CAM on a classifier built by hand ------------------------------------------------------


def _brightness_classifier() -> keras.Model:
    """build_classifier's network with weights set so that block5_conv3's channel 0 is the red
    channel max-pooled over 16x16 blocks, and the positive class's logit is 4 x its mean after
    block5_pool. Grad-CAM for the positive class must then be that map scaled to a peak of 1."""
    model = build_classifier(2, input_size=64, weights=None, head="mlp")
    for layer in model.get_layer("vgg16").layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.zeros(layer.kernel.shape, np.float32)
            for channel in range(3):
                kernel[1, 1, channel, channel] = 1.0  # the centre tap only: each layer passes its input through
            layer.kernel.assign(kernel)
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    head = model.get_layer("head")
    dense = np.zeros(head.get_layer("dense").kernel.shape, np.float32)
    dense[0, 0] = 1.0
    head.get_layer("dense").kernel.assign(dense)
    final = np.zeros(head.get_layer("probabilities").kernel.shape, np.float32)
    final[0, 1] = 4.0
    head.get_layer("probabilities").kernel.assign(final)
    return model


def _two_bright_blocks() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:32, 48:64, 0] = 255  # block row 1, column 3: upper right
    image[48:64, 0:16, 0] = 128  # block row 3, column 0: lower left, half as bright
    return image


def test_grad_cam_is_the_evidence_map_of_a_classifier_built_by_hand():
    model, spec = _brightness_classifier(), Preprocessing(64)
    cams, probabilities = grad_cam_and_probabilities(model, _two_bright_blocks()[None], spec, class_index=1)
    blocks = np.zeros((4, 4), np.float32)
    blocks[1, 3], blocks[3, 0] = 1.0, 128 / 255
    expected = cv2.resize(blocks, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert cams.shape == (1, 64, 64) and cams.dtype == np.float32
    np.testing.assert_allclose(cams[0], expected, atol=1e-5)
    # block5_pool keeps the two blocks; the logit is 4 x their mean over the 2x2 map, through BatchNorm's epsilon.
    logit = 4 * (1.0 + 128 / 255) / 4 / np.sqrt(1 + 1e-3)
    np.testing.assert_allclose(probabilities[0], [1 / (1 + np.exp(logit)), 1 / (1 + np.exp(-logit))], atol=1e-5)
    np.testing.assert_allclose(probabilities, predict_probabilities(model, _two_bright_blocks()[None], spec), atol=1e-5)


def test_grad_cam_of_a_class_with_no_evidence_is_empty():
    # The normal class's log-odds falls as the blocks brighten: no positive part anywhere.
    cam = grad_cam(_brightness_classifier(), _two_bright_blocks()[None], Preprocessing(64), class_index=0)
    assert (cam == 0).all()


def test_grad_cam_probabilities_match_predict_probabilities():
    model = build_classifier(3, input_size=64, weights=None, seed=4, head="mlp")
    for scale_mode in ("unit", "caffe"):
        spec = Preprocessing(64, scale_mode)
        images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
        cams, probabilities = grad_cam_and_probabilities(model, images, spec, class_index=2, batch_size=2)
        # Grad-CAM runs eagerly on float32 inputs; predictions run compiled on uint8 pixels, whose
        # kernels round differently (about 1e-4 on a random base's saturated logits).
        np.testing.assert_allclose(probabilities, predict_probabilities(model, images, spec), atol=2e-4)
        assert cams.shape == (5, 64, 64) and cams.min() >= 0 and cams.max() <= 1
        # Another batch size picks other oneDNN kernels: 1.36e-5 apart on an AVX2-only EPYC (within 1e-5 on AVX-512).
        np.testing.assert_allclose(cams, grad_cam(model, images, spec, 2, batch_size=8), atol=5e-5)
    with pytest.raises(ValueError, match="class_index"):
        grad_cam(model, images, spec, class_index=3)


def test_for_the_linear_head_grad_cam_from_the_forward_pass_is_class_activation_mapping():
    """With pooling, the standardiser and one Dense layer, the log-odds' gradient is the same in every
    cell: Grad-CAM is the maps weighted by the Dense weights over the standardiser's scale (CAM), and
    the maps an engine's forward pass returns give it with no second pass. Three classes, so that the
    weights depend on the other classes' probabilities."""
    keras.utils.set_random_seed(4)
    spec = Preprocessing(64)
    model = build_classifier(3, input_size=64, weights=None, seed=4, head="linear")
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    variance = rng.uniform(0.5, 2.0, 512)
    set_linear_head(model, rng.normal(0, 0.1, 512), variance, rng.normal(0, 0.3, (512, 3)), np.zeros(3))
    probabilities, maps = make_predictor(model, spec, "fp32").predict_with_maps(images)
    assert maps.shape == (6, 4, 4, 512)  # block5_conv3 at 64 px
    kernel = model.get_layer("head").get_layer("probabilities").kernel.numpy()
    compared = 0  # maps with a positive part (a map with none is 0 both ways)
    for class_index in range(3):
        others = probabilities.copy()
        others[:, class_index] = 0
        others /= others.sum(axis=1, keepdims=True)
        weights = (kernel[:, class_index][None] - others @ kernel.T) / np.sqrt(variance)[None]  # (n, channels)
        by_hand = np.maximum(np.einsum("nhwc,nc->nhw", maps, weights), 0)
        peak = by_hand.max(axis=(1, 2), keepdims=True)
        by_hand = np.divide(by_hand, peak, out=np.zeros_like(by_hand), where=peak > 0)
        compared += int((peak > 0).sum())
        from_forward, head_probabilities = cams_from_maps(model, maps, class_index)
        np.testing.assert_allclose(from_forward, by_hand, atol=1e-4)
        np.testing.assert_allclose(head_probabilities, probabilities, atol=1e-5)
        # The float32 reference, with a forward pass of its own: the same maps, resized.
        reference = grad_cam(model, images, spec, class_index)
        resized = cams_from_maps(model, maps, class_index, (64, 64))[0]
        np.testing.assert_allclose(resized, reference, atol=1e-4)
    assert compared >= 6, compared


def test_overlay_blends_the_jet_colour_map():
    image = np.full((32, 48, 3), 100, np.uint8)
    cam = np.zeros((4, 6), np.float32)
    assert (overlay(image, cam, alpha=0.0) == image).all()
    hot = overlay(image, np.ones((4, 6), np.float32), alpha=1.0)
    assert hot.shape == (32, 48, 3) and hot.dtype == np.uint8
    assert (hot[0, 0] == [128, 0, 0]).all()  # JET's top is dark red, in RGB order
    assert overlay(image[:, :, 0], cam).shape == (32, 48, 3)


# --- the lung prior and the phantoms ---------------------------------------------------------------


def test_lung_boxes_split_at_the_midline_and_name_image_sides():
    left, right, both = lung_mask(64, "image_left"), lung_mask(64, "image_right"), lung_mask(64)
    assert not (left & right).any() and ((left | right) == both).all()
    assert left[:, :32].any() and not left[:, 32:].any() and not right[:, :32].any()
    assert not both[:6].any() and both[6:59].any() and not both[59:].any()  # rows 0.10..0.92 of 64


def test_lung_boxes_cover_the_phantom_lungs_and_leave_out_the_marker():
    for size in (64, 128, 256):
        for seed in range(40):
            image = chest_phantom(np.random.default_rng(seed), size, opacities=seed % 2 == 1, marker=True)
            dark = image < 110  # air in the lungs; everything else is 140 or brighter before noise
            assert dark.sum() > 0.15 * size * size and not (dark & ~lung_mask(size)).any()
            top, bottom, left, right = MARKER_BOX
            marker = np.zeros_like(dark)
            marker[int(size * top):int(size * bottom), int(size * left):int(size * right)] = True
            assert (image[marker] == 255).all() and not (marker & lung_mask(size)).any()


def test_opacity_side_moves_only_the_opacities():
    for seed in range(10):
        left = chest_phantom(np.random.default_rng(seed), 128, True, opacity_side="image_left").astype(int)
        right = chest_phantom(np.random.default_rng(seed), 128, True, opacity_side="image_right").astype(int)
        difference = left - right  # same anatomy and noise: the random draws are the same
        assert not difference[~lung_mask(128)].any()
        assert difference[lung_mask(128, "image_left")].sum() > 0 > difference[lung_mask(128, "image_right")].sum()
    with pytest.raises(ValueError, match="opacity_side"):
        chest_phantom(np.random.default_rng(0), 64, True, opacity_side="left")


def test_mask_images_blanks_the_lungs_or_the_rest():
    images = np.random.default_rng(0).integers(0, 256, (2, 50, 40, 3), dtype=np.uint8)
    (top, bottom, left, _), (_, _, _, right) = LUNG_BOXES["image_left"], LUNG_BOXES["image_right"]
    rows, columns = (np.arange(50) + 0.5) / 50, (np.arange(40) + 0.5) / 40  # pixel centres
    lungs = ((rows >= top) & (rows < bottom))[:, None] & ((columns >= left) & (columns < right))[None, :]
    outside = mask_images(images, keep="outside")
    for image, masked in zip(images, outside):
        assert (masked[lungs] == int(round(image.mean()))).all() and (masked[~lungs] == image[~lungs]).all()
    inside = mask_images(images, keep="lungs", fill=0)
    assert (inside[:, ~lungs] == 0).all() and (inside[:, lungs] == images[:, lungs]).all()
    with pytest.raises(ValueError, match="keep"):
        mask_images(images, keep="heart")


def test_lung_share_by_hand():
    cam = np.zeros((10, 10))
    cam[5, 2] = 3.0  # row 0.55, column 0.25: the image-left lung
    assert lung_share(cam) == 1.0 and lung_share(cam, "image_left") == 1.0 and lung_share(cam, "image_right") == 0.0
    cam[0, 5] = 1.0  # row 0.05: above the lungs
    assert lung_share(cam) == pytest.approx(0.75)
    assert lung_share(np.ones((50, 50))) == pytest.approx(lung_mask(50).mean())
    assert np.isnan(lung_share(np.zeros((4, 4))))


# --- Grad-CAM on a trained classifier --------------------------------------------------------------


def _phantom(rng: np.random.Generator, spec: Preprocessing, **options) -> np.ndarray:
    return resize(np.repeat(chest_phantom(rng, 256, **options)[:, :, None], 3, axis=2), spec)


def _train_block5_and_head(model: keras.Model, images: np.ndarray, labels: np.ndarray, spec: Preprocessing) -> None:
    """Train block5 and the head on block4's cached output (blocks 1-4 stay random and frozen):
    what fine-tuning trains, at a fraction of its cost on two CPU cores."""
    unfreeze_top_block(model)
    base = model.get_layer("vgg16")
    block4 = keras.Model(base.input, base.get_layer("block4_pool").output)
    features = block4.predict(scale(images.astype(np.float32) / 255.0, spec), batch_size=16, verbose=0)
    x = inputs = keras.Input(features.shape[1:])
    for name in ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"):
        x = base.get_layer(name)(x)  # the model's own layers: training this trains the model
    top = keras.Model(inputs, model.get_layer("head")(x))
    top.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy")
    top.fit(features, keras.utils.to_categorical(labels, 2), epochs=20, batch_size=16, shuffle=True, verbose=0)


@pytest.mark.slow
def test_grad_cam_follows_the_opacities_from_one_lung_to_the_other():
    """Pairs of phantoms identical but for the side of their opacities: Grad-CAM must give the
    image-left lung more of its mass when the opacities are there.

    A paired comparison, not "most of the mass on the right lung": on a VGG16 whose blocks 1-4
    are random (weights=None) every block5 map carries a large image-independent part, and the
    share on the opacities' side stays near 0.5 (0.42-0.55 over seeds); only the shift between
    the members of a pair is the model's evidence. At 64 px the 4x4 map's cells all see the whole
    image and even the shift's sign varied by seed, hence 128 px.
    """
    keras.utils.set_random_seed(2)
    spec = Preprocessing(128)
    rng = np.random.default_rng(2)
    labels = np.arange(48) % 2
    images = np.stack([_phantom(rng, spec, opacities=bool(label)) for label in labels])  # opacities on either side
    model = build_classifier(2, input_size=128, weights=None, seed=2, head="mlp")
    _train_block5_and_head(model, images, labels, spec)

    pairs = {side: np.stack([_phantom(np.random.default_rng(1000 + k), spec, opacities=True, opacity_side=side)
                             for k in range(12)]) for side in ("image_left", "image_right")}
    negatives = np.stack([_phantom(np.random.default_rng(2000 + k), spec) for k in range(12)])
    left_share = {}
    for side, pair_images in pairs.items():
        cams, probabilities = grad_cam_and_probabilities(model, pair_images, spec, class_index=1)
        assert probabilities[:, 1].min() > predict_probabilities(model, negatives, spec)[:, 1].max()  # it learned
        left, right = (np.array([lung_share(cam, lung) for cam in cams]) for lung in ("image_left", "image_right"))
        left_share[side] = left / (left + right)
    shift = left_share["image_left"] - left_share["image_right"]
    assert (shift > 0).sum() >= 11 and shift.mean() > 0.015, f"shift per pair {np.round(shift, 3)}"

    # The same explanations from each engine's own forward pass (the mlp head: a compiled gradient
    # through the head only), held to the explanation gate against the float32 Grad-CAM.
    # Measured (AMD EPYC with AVX-512 and bf16): bf16's maps correlate 1.000 (median) with float32's and
    # move the lung share by at most 0.003 on 95 % of the 36 images, int8's 0.999 and 0.013; float32's
    # are the reference's own, to 1e-5.
    explained = np.concatenate([*pairs.values(), negatives])
    reference, reference_probabilities = grad_cam_and_probabilities(model, explained, spec, class_index=1)
    int8 = quantize_int8(model, spec, images)
    for engine in ENGINES:
        predictor = make_predictor(model, spec, engine, int8 if engine == "int8" else None)
        probabilities, maps = predictor.predict_with_maps(explained)
        cams = cams_from_maps(model, maps, 1)[0]  # at the maps' resolution, as training's check has them
        if engine == "fp32":
            np.testing.assert_allclose(cams_from_maps(model, maps, 1, (128, 128))[0], reference, atol=1e-5)
            reference_maps = cams
        check = check_engine(engine, reference_probabilities[:, 1], probabilities[:, 1], np.repeat([1, 0], [24, 12]), 0.5,
                             (reference_maps, cams), (128, 128))
        assert check.explanation_passed and check.explanation_correlation > 0.99, check.summary


def test_explaining_batches_of_any_size_compiles_the_gradient_at_most_twice():
    """Screening explains however many images of a batch are flagged: the compiled gradient through
    the head generalises its batch size rather than tracing again for each count."""
    from model.gradcam import _parts

    model = build_classifier(2, input_size=64, weights=None, head="mlp")
    maps = np.random.default_rng(0).random((16, 4, 4, 512)).astype(np.float32)
    for count in (3, 5, 7, 16, 1, 11):
        cams, probabilities = cams_from_maps(model, maps[:count], 1)
        assert cams.shape == (count, 4, 4) and probabilities.shape == (count, 2)
    assert _parts(model).experimental_get_tracing_count() <= 2
