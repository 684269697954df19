"""Two-stage training: the head on cached base features (stage 1), then optionally block5 (stage 2).

Stage 1 with the base frozen computes the base's features once per image and augmentation draw,
so every epoch costs only the head. Epoch ``e`` trains on draw ``e mod augment_draws``, one
augmented view of each image per epoch as in naive training. ``fit_naive_frozen`` trains the
same thing end to end (kept for the benchmark and for checking the cached path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from model.augmentation import Augmentation, build_augmentation
from model.defaults import BATCH_SIZE, EPOCHS, HEAD
from model.evaluation import auc
from model.network import needs_standardising, standardise_on
from model.preprocessing import Preprocessing, scale
from model.validity import within_stratum_auc

__all__ = ["TrainingConfig", "TrainingData", "extract_features", "fine_tune", "fit_head_cached", "fit_naive_frozen"]


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = EPOCHS
    fine_tune_epochs: int = 0
    batch_size: int = BATCH_SIZE
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    augment: bool = True
    augmentation: Augmentation = field(default_factory=Augmentation)
    augment_draws: int = 3
    class_weights: bool = True
    patience: int = 10
    seed: int = 0
    head: str = HEAD  # model.network.HEADS
    # L2 strengths tried for the linear head when it is trained with epochs (fit_head_cached); the
    # one that does best on validation is kept. One value: no choice.
    head_l2: tuple[float, ...] = (0.1, 1.0, 10.0)
    # Whether the cross-validated linear head may also learn from augmented copies (a candidate
    # beside the plain features; model/linear_head.py). Off: at 224 px it lost to plain features
    # on the test splits of bench/validity_bench.py.
    augment_head: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "augment_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be 0 or more, got {self.fine_tune_epochs}")
        if not self.head_l2 or any(value < 0 for value in self.head_l2):
            raise ValueError(f"head_l2 must hold one or more values >= 0, got {self.head_l2}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainingData:
    """Resized uint8 images ``(n, size, size, 3)`` and integer labels for training and validation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    # Per-image weights (e.g. balancing classes inside metadata strata). When given they replace
    # the class weights in training, and weight the validation loss that early stopping watches.
    w_train: np.ndarray | None = None
    w_val: np.ndarray | None = None
    # Metadata levels of the validation images, per variable. When one has a level holding both
    # classes, training selects (early stopping, head L2, weighting) on the mean validation
    # within-stratum AUC of ``positive_index`` instead of the loss: shortcut learning cannot inflate it.
    val_strata: dict[str, np.ndarray] = field(default_factory=dict)
    # Candidate weightings (name, train weights, validation weights), tried in turn; the one that
    # does best on validation is kept. Empty: ``w_train``/``w_val`` (or class weights) alone.
    weightings: tuple[tuple[str, np.ndarray | None, np.ndarray | None], ...] = ()
    positive_index: int = 1

    def train_weights(self, class_weights: bool) -> np.ndarray:
        if self.w_train is not None:
            return np.asarray(self.w_train, np.float32)
        return sample_weights(self.y_train, self.num_classes, class_weights)


def sample_weights(labels: np.ndarray, num_classes: int, balanced: bool) -> np.ndarray:
    """Per-sample weights from scikit-learn's 'balanced' class weights (or all ones)."""
    if not balanced:
        return np.ones(len(labels), np.float32)
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    table = np.ones(num_classes, np.float32)
    table[present] = weights
    return table[labels].astype(np.float32)


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        weighted_metrics=[],
    )


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def extract_features(
    base: keras.Model,
    images: np.ndarray,
    spec: Preprocessing,
    augmentation: keras.Sequential | None = None,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """Base features of uint8 images, optionally through one draw of ``augmentation``."""
    features = []
    for batch in _batches(images, batch_size):
        x = tf.convert_to_tensor(batch, tf.float32) / 255.0
        if augmentation is not None:
            x = augmentation(x, training=True)
        # predict_on_batch runs a compiled graph: under bf16 about three times faster than an eager call.
        features.append(np.asarray(base.predict_on_batch(scale(x, spec)), dtype=np.float32))
    return np.concatenate(features) if features else np.zeros((0, *base.output.shape[1:]), np.float32)


def _cached_epochs(
    draws: Sequence[np.ndarray], targets: np.ndarray, weights: np.ndarray, config: TrainingConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        features = draws[epoch % len(draws)]
        order = rng.permutation(len(targets))
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            yield features[index], targets[index], weights[index]


def fit_head_cached(
    model: keras.Model,
    data: TrainingData,
    spec: Preprocessing,
    config: TrainingConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    on_features: Callable[[int, int], None] | None = None,
    feature_base: keras.Model | None = None,
) -> dict[str, list[float]]:
    """Stage 1: train the head of ``model`` on cached base features. Returns the Keras history.
    ``feature_base`` computes them when given (the same base under another engine,
    model.inference.choose_feature_base)."""
    base, head = feature_base or model.get_layer("vgg16"), model.get_layer("head")
    augmentation = build_augmentation(config.augmentation, config.seed) if config.augment else None
    draws = []
    for draw in range(config.augment_draws if augmentation is not None else 1):
        draws.append(extract_features(base, data.x_train, spec, augmentation, config.batch_size))
        if on_features is not None:
            on_features(draw + 1, len(draws) if augmentation is None else config.augment_draws)
    val_features = extract_features(base, data.x_val, spec, None, config.batch_size)

    if needs_standardising(model):
        standardise_on(model, np.concatenate(draws))
    targets = keras.utils.to_categorical(data.y_train, data.num_classes)
    final = head.get_layer("probabilities")
    strengths = config.head_l2 if config.head == "linear" else (None,)
    weightings = data.weightings or ((None, data.w_train, data.w_val),)
    candidates = [(index, l2) for index in range(len(weightings)) for l2 in strengths]
    start, best = head.get_weights(), None
    for index, l2 in candidates:
        _, w_train, w_val = weightings[index]
        weights = np.asarray(w_train, np.float32) if w_train is not None else data.train_weights(config.class_weights)
        validation = (val_features, keras.utils.to_categorical(data.y_val, data.num_classes))
        if w_val is not None:
            validation = (*validation, np.asarray(w_val, np.float32))
        if l2 is not None:
            final.kernel.regularizer = keras.regularizers.L2(l2) if l2 else None
        head.set_weights(start)
        _compile(head, config.learning_rate)
        selection = ValidationAUC(val_features, data.y_val, data.positive_index, data.val_strata)
        history = head.fit(
            _cached_epochs(draws, targets, weights, config),
            steps_per_epoch=math.ceil(len(targets) / config.batch_size),
            epochs=config.epochs,
            validation_data=validation,
            callbacks=[selection, *_early_stopping(config, selection.monitor),
                       *(callbacks if len(candidates) == 1 else ())],
            shuffle=False,  # the generator shuffles, with the config's seed
            verbose=0,
        )
        if best is None or selection.best > best[0]:
            best = (selection.best, index, l2, head.get_weights(), history.history)
    score, index, l2, chosen, found = best
    head.set_weights(chosen)
    if l2 is not None:
        final.kernel.regularizer = keras.regularizers.L2(l2) if l2 else None
    if len(candidates) > 1:
        for callback in callbacks:  # progress and logging see the chosen run, replayed
            callback.set_model(head)
            for epoch in range(len(found["loss"])):
                callback.on_epoch_end(epoch, {k: v[epoch] for k, v in found.items()})
    found = dict(found)
    if l2 is not None:
        found["selected_l2"] = [float(l2)]
    if data.weightings:
        found["selected_weighting"] = [float(index)]
    return found


class ValidationAUC(keras.callbacks.Callback):
    """Adds ``val_auc`` (positive class vs rest) and, given metadata levels with both classes,
    ``val_within_auc`` to each epoch's logs; ``val_selection`` (the latter, or else the former,
    with the loss as tie-breaker) drives early stopping and the choice of the head's L2."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, positive_index: int,
                 strata: dict[str, np.ndarray] | None = None, batch_size: int = 256) -> None:
        super().__init__()
        self.features, self.batch_size = features, batch_size
        self.is_positive = np.asarray(labels) == positive_index
        self.positive_index = positive_index
        # Only variables with a level holding both classes can say anything within levels.
        self.strata = {name: levels for name, levels in (strata or {}).items()
                       if within_stratum_auc(self.is_positive, np.zeros(len(labels)), levels) is not None}
        self.monitor = "val_selection"
        self.by = "val_within_auc" if self.strata else "val_auc"
        self.best = -np.inf

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        scores = np.concatenate([keras.ops.convert_to_numpy(self.model(batch, training=False))[:, self.positive_index]
                                 for batch in _batches(self.features, self.batch_size)])
        value = auc(self.is_positive, scores)
        logs["val_auc"] = 0.5 if value is None else value  # Keras compares numbers: one class counts as chance
        if self.strata:
            logs["val_within_auc"] = float(np.mean([within_stratum_auc(self.is_positive, scores, levels)
                                                    for levels in self.strata.values()]))
        # AUCs on a small validation split tie (often at 1.0 on easy data); the loss breaks ties, so
        # a tie never keeps an under-trained first epoch.
        logs[self.monitor] = logs[self.by] - 1e-3 * logs.get("val_loss", 0.0)
        self.best = max(self.best, logs[self.monitor])


def _early_stopping(config: TrainingConfig, monitor: str = "val_loss") -> list[keras.callbacks.Callback]:
    mode = "min" if monitor.endswith("loss") else "max"
    return [keras.callbacks.EarlyStopping(monitor, mode=mode, patience=config.patience, restore_best_weights=True)]


def _image_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    spec: Preprocessing,
    batch_size: int,
    augmentation: keras.Sequential | None,
    weights: np.ndarray | None,
    seed: int,
) -> tf.data.Dataset:
    targets = keras.utils.to_categorical(labels, num_classes)
    parts = (images, targets) if weights is None else (images, targets, weights)
    dataset = tf.data.Dataset.from_tensor_slices(parts)
    if augmentation is not None:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def prepare(x, *rest):
        x = tf.cast(x, tf.float32) / 255.0
        if augmentation is not None:
            x = augmentation(x, training=True)
        return (scale(x, spec), *rest)

    return dataset.batch(batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def fit_naive_frozen(
    model: keras.Model,
    data: TrainingData,
    spec: Preprocessing,
    config: TrainingConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Stage 1 the textbook way: every epoch runs every image through the frozen base again."""
    model.get_layer("vgg16").trainable = False
    return _fit_end_to_end(model, data, spec, config, config.epochs, config.learning_rate, callbacks)


def fine_tune(
    model: keras.Model,
    data: TrainingData,
    spec: Preprocessing,
    config: TrainingConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    policy: str = "float32",
) -> dict[str, list[float]]:
    """Stage 2: unfreeze block5 and train end to end with a small learning rate.

    ``policy`` 'mixed_bfloat16' computes the base in bf16 while its variables, and so the updates
    and the saved model, stay float32 (bf16 needs no loss scaling: its range is float32's). An epoch
    ran 2.2x faster so on a CPU with AMX (bench/train_time_bench.py); the caller chooses it where stage 1's
    bf16 features agreed with fp32's and were faster (``model.inference.choose_feature_base``)."""
    from model.inference import with_base_policy
    from model.network import unfreeze_top_block

    unfreeze_top_block(model)
    if policy == "float32":
        return _fit_end_to_end(model, data, spec, config, config.fine_tune_epochs, config.fine_tune_learning_rate,
                               callbacks)
    mixed = with_base_policy(model, policy)  # the head is shared; the base is a copy, copied back below
    unfreeze_top_block(mixed)
    history = _fit_end_to_end(mixed, data, spec, config, config.fine_tune_epochs, config.fine_tune_learning_rate,
                              callbacks)
    model.get_layer("vgg16").set_weights(mixed.get_layer("vgg16").get_weights())
    return history


def _fit_end_to_end(model, data, spec, config, epochs, learning_rate, callbacks) -> dict[str, list[float]]:
    if needs_standardising(model):
        standardise_on(model, extract_features(model.get_layer("vgg16"), data.x_train, spec, None, config.batch_size))
    augmentation = build_augmentation(config.augmentation, config.seed) if config.augment else None
    weights = data.train_weights(config.class_weights)
    train = _image_dataset(
        data.x_train, data.y_train, data.num_classes, spec, config.batch_size, augmentation, weights, config.seed
    )
    val = _image_dataset(data.x_val, data.y_val, data.num_classes, spec, config.batch_size, None, data.w_val,
                         config.seed)
    _compile(model, learning_rate)
    # The same selection as stage 1: within-stratum AUC on validation, which shortcuts cannot raise.
    selection = ValidationAUC(scale(data.x_val.astype(np.float32) / 255.0, spec), data.y_val, data.positive_index,
                              data.val_strata, config.batch_size)
    history = model.fit(
        train, epochs=epochs, validation_data=val,
        callbacks=[selection, *_early_stopping(config, selection.monitor), *callbacks],
        shuffle=False, verbose=0,  # tf.data shuffles, with the config's seed
    )
    return history.history


def predict_probabilities(model: keras.Model, images: np.ndarray, spec: Preprocessing, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Class probabilities for resized uint8 images, by the fp32 reference engine."""
    from model.inference import make_predictor

    return make_predictor(model, spec, "fp32").predict(images, batch_size)