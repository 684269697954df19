"""Where does the classifier look? Grad-CAM (Selvaraju et al. 2017) on VGG16's last convolution.

For ``model.network.build_classifier``'s model: the nested base 'vgg16' and the nested head
'head'. The map weights each channel of block5_conv3 (the last convolution, before block5_pool) by
the mean gradient of the class's score (its log-odds, see ``_log_odds``) over that channel, sums,
keeps the positive part, and is scaled to [0, 1] per image and resized to the input resolution.

Read the maps with care on models without ImageNet weights: there block5's features are dense,
each map carries a large part that is the same for every image, and on phantoms the share of
mass on the side of the opacities stays near 0.5 even when the model relies on that side; only
the shift between images is evidence (tests/test_gradcam.py). At 64 px the 4x4 map's cells all
see the whole image, so even that shift is unreliable there.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf

from model.anatomy import resized
from model.defaults import BATCH_SIZE
from model.inference import Predictor, make_predictor
from model.preprocessing import Preprocessing

__all__ = ["cams_from_maps", "grad_cam", "grad_cam_and_probabilities", "overlay", "predict_and_explain"]



def _parts(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    # Built once per model (screening explains a few images per batch, night after night) and kept
    # on it, past Keras' attribute tracking; model.network drops it when the head is refitted.
    if getattr(model, "_gradcam_parts", None) is None:
        object.__setattr__(model, "_gradcam_parts", _build_parts(model))
    return model._gradcam_parts


def _build_parts(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """A compiled function from maps of the last convolution to their Grad-CAM and the class
    probabilities. The score's gradient with respect to the maps runs through block5's pooling and
    the head only, never through the base: the base's work is the forward pass that made the maps,
    whichever engine ran it. The layers (and weights) are the model's own."""
    head = model.get_layer("head")
    pooling = model.get_layer("vgg16").get_layer("block5_pool")
    # The score is built from the logits before softmax (see _log_odds), hence the final layer apart.
    final = head.get_layer("probabilities")
    to_head_features = keras.Model(head.input, final.input)

    @tf.function(reduce_retracing=True)
    def from_maps(maps: tf.Tensor, class_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(maps)
            features = to_head_features(pooling(maps), training=False)
            logits = tf.matmul(features, final.kernel) + final.bias
            score = _log_odds(logits, class_index)
        channel_weights = tf.reduce_mean(tape.gradient(score, maps), axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(channel_weights * maps, axis=-1)), tf.nn.softmax(logits)

    return from_maps


def _log_odds(logits: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
    """The class's logit minus the log-sum-exp of the others: its log-odds against the rest.

    Softmax ignores a shift common to all logits, so nothing in training pins down the class's
    logit alone: its gradient carries an arbitrary shared part (with the raw logit, maps of our
    two-class phantom models changed side with it). The log-odds cancels that part; unlike the
    probability it does not saturate on confident images, where the gradient of a probability
    near 1 vanishes.
    """
    others = tf.one_hot(class_index, tf.shape(logits)[1], on_value=-np.inf, off_value=0.0, dtype=logits.dtype)
    return tf.gather(logits, class_index, axis=1) - tf.reduce_logsumexp(logits + others, axis=1)


def _check_class(model: keras.Model, class_index: int) -> None:
    classes = model.output.shape[-1]
    if not 0 <= class_index < classes:
        raise ValueError(f"class_index must lie in 0..{classes - 1}, got {class_index}")


def cams_from_maps(model: keras.Model, maps: np.ndarray, class_index: int, size: tuple[int, int] | None = None,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM for ``class_index`` from maps of the last convolution (``(n, h, w, channels)``, as
    any engine's forward pass returns them, see model.inference), and the probabilities the head
    gives them. Maps are scaled to [0, 1] per image, and resized to ``size`` (height, width) when given.

    For the linear head (pooling, standardisation, one Dense layer) each channel's mean gradient is
    its Dense weight over the standardiser's scale, up to one factor (block5_pool sends a window's
    gradient to its largest cell, and every window has one): the map is class activation mapping
    (tests/test_gradcam.py checks this by hand)."""
    _check_class(model, class_index)
    from_maps = _parts(model)
    maps = np.asarray(maps, np.float32)
    cams, probabilities = [], []
    for start in range(0, len(maps), batch_size):
        cam, probability = from_maps(tf.constant(maps[start : start + batch_size]), tf.constant(class_index))
        cams.append(cam.numpy())
        probabilities.append(probability.numpy())
    if not cams:
        shape = size or maps.shape[1:3]
        return np.zeros((0, *shape), np.float32), np.zeros((0, model.output.shape[-1]), np.float32)
    cam = np.concatenate(cams)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)  # a map with no positive part stays 0
    if size is not None:
        cam = np.stack([resized(one, size) for one in cam])
    return cam.astype(np.float32), np.concatenate(probabilities)


def predict_and_explain(predictor: Predictor, model: keras.Model, images_uint8: np.ndarray, class_index: int,
                        batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
    """``predictor``'s probabilities of the images and the Grad-CAM of ``class_index`` from the maps of
    the same forward pass, at the maps' resolution (None where the engine gives no maps), batch by
    batch: maps of a whole test split would hold 400 KB an image at 224 px."""
    probabilities, cams = [], []
    for start in range(0, len(images_uint8), batch_size):
        probability, maps = predictor.predict_with_maps(images_uint8[start : start + batch_size], batch_size)
        probabilities.append(probability)
        cams.append(None if maps is None else cams_from_maps(model, maps, class_index)[0])
    if not probabilities:
        return np.zeros((0, predictor.classes), np.float32), None
    return np.concatenate(probabilities), None if any(cam is None for cam in cams) else np.concatenate(cams)


def grad_cam_and_probabilities(model: keras.Model, images_uint8: np.ndarray, spec: Preprocessing, class_index: int,
                               batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``(n, H, W)`` float32 in [0, 1] at the input resolution for ``class_index``,
    and the class probabilities ``(n, classes)`` of the same forward pass: the float32 reference,
    with a forward pass of its own (an engine's forward pass gives the maps for nothing, see
    ``cams_from_maps``)."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4 or images_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (n, h, w, 3), got {images_uint8.dtype} {images_uint8.shape}")
    _check_class(model, class_index)
    probabilities, cams = predict_and_explain(make_predictor(model, spec, "fp32"), model, images_uint8, class_index,
                                              batch_size)
    return np.stack([resized(cam, images_uint8.shape[1:3]) for cam in cams]) if len(cams) else \
        np.zeros((0, *images_uint8.shape[1:3]), np.float32), probabilities


def grad_cam(model: keras.Model, images_uint8: np.ndarray, spec: Preprocessing, class_index: int,
             batch_size: int = 8) -> np.ndarray:
    """Grad-CAM maps ``(n, H, W)`` float32 in [0, 1] at the input resolution for ``class_index``."""
    return grad_cam_and_probabilities(model, images_uint8, spec, class_index, batch_size)[0]


def overlay(image_uint8_rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image with the map laid over it in the JET colour map (red = most weight); uint8 RGB.
    A grayscale image is shown in grey; the map is resized to the image."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image_uint8_rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB or grayscale image, got {image.dtype} {image.shape}")
    cam = cv2.resize(np.asarray(cam, np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0.0, 1.0) * 255), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)  # OpenCV colour maps come in BGR
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
