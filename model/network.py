"""VGG16 transfer-learning classifier: the ImageNet base without its top, and a new head.

The head pools over the whole feature map. The founding tutorial's ``AveragePooling2D((4, 4))``
on VGG16's 7x7 map keeps only the top-left 4x4 cells and so ignores the lower and outer lungs.
"""

from __future__ import annotations

import keras
import numpy as np

from model.defaults import HEAD

__all__ = ["HEADS", "LAST_CONVOLUTION", "WeightsUnavailable", "build_base", "build_classifier", "build_head", "needs_standardising",
           "set_calibration", "set_linear_head", "standardise_on", "unfreeze_top_block"]

IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
# VGG16's last convolution: its maps are what Grad-CAM weighs (model/gradcam.py), and every engine returns them.
LAST_CONVOLUTION = "block5_conv3"


class WeightsUnavailable(RuntimeError):
    """The requested base weights could not be had."""


def build_base(input_size: int = 224, weights: str | None = "imagenet", seed: int = 0) -> keras.Model:
    """VGG16 without its classifier. ``weights``: 'imagenet' (Keras' download and cache),
    a local weights file, or None (random initialisation from ``seed``)."""
    shape = (input_size, input_size, 3)
    if weights == "imagenet":
        try:
            return keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as error:  # Keras raises a bare Exception for a failed download
            raise WeightsUnavailable(
                f"could not download the ImageNet weights for VGG16 ({error}). Without internet access, "
                f"pass a local or S3 copy of {IMAGENET_FILE} (--weights PATH_OR_URI), "
                "or train from scratch (--weights none)"
            ) from error
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    if weights is None:
        # Keras initialises VGG16 with Glorot, which roughly halves activations at each ReLU layer:
        # after 13 of them the features are ~1e-3 and a head on a frozen base learns nothing.
        # He initialisation keeps them of order one.
        # Explicit seeds: unseeded Keras initialisers draw from Python's global RNG, which other
        # threads (Prefect's among them) also draw from, so runs would not repeat.
        convolutions = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
        for number, layer in enumerate(convolutions):
            layer.kernel.assign(keras.initializers.HeNormal(seed=seed * 1000 + number)(layer.kernel.shape))
    else:
        try:
            base.load_weights(weights)
        except (OSError, ValueError) as error:
            raise WeightsUnavailable(f"{weights}: not a VGG16 (no top) weights file: {error}") from error
    return base


HEADS = ("linear", "mlp")


def build_head(
    feature_shape: tuple[int, ...], num_classes: int, units: int = 64, dropout: float = 0.5, seed: int = 0,
    kind: str = HEAD, l2: float = 0.0,
) -> keras.Model:
    """The new head on VGG16's feature map. Both pool over the whole map.

    ``mlp``: BatchNormalization -> Dense(units, relu) -> Dropout -> Dense(num_classes, softmax), the
    tutorial's shape. ``linear``: a standardisation fitted on the training features (a Keras
    ``Normalization`` layer, adapted before training) -> Dense(num_classes, softmax) with an L2
    penalty: a regularised logistic regression. On data where age and source predict the label,
    the small linear head fits that shortcut less than the MLP (bench/validity_bench.py).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if kind not in HEADS:
        raise ValueError(f"kind must be one of {HEADS}, got {kind!r}")
    features = keras.Input(feature_shape, name="features")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    regulariser = keras.regularizers.L2(l2) if l2 else None
    if kind == "linear":
        x = keras.layers.Normalization(axis=-1, name="standardise")(x)
    else:
        # Pooled VGG16 features differ in scale by orders of magnitude between channels (and between
        # ImageNet and random weights); standardising them lets one learning rate suit all.
        x = keras.layers.BatchNormalization(momentum=0.9, name="normalise")(x)  # few steps per epoch: adapt fast
        x = keras.layers.Dense(units, activation="relu", name="dense", kernel_regularizer=regulariser,
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
        x = keras.layers.Dropout(dropout, name="dropout", seed=seed + 1)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities",
                                 kernel_regularizer=regulariser if kind == "linear" else None,
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2))(x)
    return keras.Model(features, outputs, name="head")


def needs_standardising(model: keras.Model) -> bool:
    """Whether the classifier's linear head still waits for its standardisation to be fitted."""
    head = model.get_layer("head")
    if not any(layer.name == "standardise" for layer in head.layers):
        return False
    mean, variance = (weight.numpy() for weight in head.get_layer("standardise").weights[:2])
    return bool((mean == 0).all() and (variance == 1).all())  # as built, before adapt()


# Compiled wrappers other modules keep on a model (model.inference's predictors, model.gradcam's
# parts). Keras' Normalization holds its fitted mean and variance as constants, which a traced graph
# captures: a refitted head must not be served by graphs traced before.
_COMPILED = ("_networks", "_gradcam_parts")


def _forget_compiled(model: keras.Model) -> None:
    for name in _COMPILED:
        model.__dict__.pop(name, None)


def standardise_on(model: keras.Model, features) -> None:
    """Fit the linear head's standardisation on base features ``(n, h, w, c)`` of training images."""
    head = model.get_layer("head")
    layer = head.get_layer("standardise")
    layer.adapt(features.mean(axis=(1, 2)))
    _forget_compiled(model)


def set_linear_head(model: keras.Model, mean, variance, kernel, bias) -> None:
    """Put a fitted logistic regression into the linear head: its standardisation (per-feature
    mean and variance of the pooled features) and its softmax layer's kernel and bias."""
    head = model.get_layer("head")
    layer = head.get_layer("standardise")
    layer.adapt_mean.assign(keras.ops.convert_to_tensor(mean, "float32"))
    layer.adapt_variance.assign(keras.ops.convert_to_tensor(variance, "float32"))
    layer.finalize_state()  # Normalization reads the adapted statistics from here
    _forget_compiled(model)
    head.get_layer("probabilities").set_weights([keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(kernel, "float32")),
                                                 keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(bias, "float32"))])


def set_calibration(model: keras.Model, temperature: float, bias: np.ndarray) -> None:
    """Bake ``softmax(z / T + b)`` into the model: the final Dense's kernel divided by T and its
    bias divided by T plus b give exactly those logits, so screening writes calibrated
    probabilities with no extra code (model/calibration.py fits T and b)."""
    final = model.get_layer("head").get_layer("probabilities")
    final.kernel.assign(final.kernel / temperature)
    final.bias.assign(final.bias / temperature + np.asarray(bias, np.float32))


def build_classifier(
    num_classes: int,
    input_size: int = 224,
    weights: str | None = "imagenet",
    head_units: int = 64,
    dropout: float = 0.5,
    seed: int = 0,
    head: str = HEAD,
    l2: float = 0.0,
) -> keras.Model:
    """The whole classifier, image in, class probabilities out, with the base frozen.

    Its two parts are the layers named 'vgg16' and 'head', so stage 1 can train the head alone
    on cached base features and the classifier shares the result.
    """
    base = build_base(input_size, weights, seed)
    base.trainable = False
    top = build_head(tuple(base.output.shape[1:]), num_classes, head_units, dropout, seed, head, l2)
    image = keras.Input((input_size, input_size, 3), name="image")
    return keras.Model(image, top(base(image)), name="cxr_vgg16")


def unfreeze_top_block(model: keras.Model) -> None:
    """Make block5 of the base trainable and everything below it frozen (VGG16 has no BatchNorm)."""
    base = model.get_layer("vgg16")
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")
