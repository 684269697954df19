"""A class-conditional DCGAN for grayscale chest X-rays (64-128 px), to balance classes (#14).

Why one class-conditional network rather than one small DCGAN per class: the classes share almost
all of their anatomy (lungs, ribs, spine) and differ in a few findings. One generator learns the
anatomy from every image and the class from a label embedding, so the minority class, which has the
fewest images and is the one to synthesise, borrows the majority's anatomy instead of learning it
from a handful of examples; it is also one network to train, version and check instead of several.

Architecture (DCGAN, Radford et al. 2016), sized to train on a CPU in minutes at 64 px:

- Generator: noise (``noise_dim``) joined to a learned label embedding -> Dense to a 4x4 map ->
  upsampling blocks (nearest-neighbour upsampling + 3x3 convolution, which avoids the checkerboard
  of strided transposed convolutions; BatchNorm; ReLU), halving the channels at each, until
  ``image_size`` -> 3x3 convolution to one channel, tanh. 64 px has four blocks, 128 px five.
- Discriminator: strided 4x4 convolutions with LeakyReLU, every weight layer under Keras'
  ``SpectralNormalization`` (Miyato et al. 2018: it bounds the discriminator's Lipschitz constant,
  the cheapest of the usual stabilisers: one power iteration per step, against a gradient penalty's
  second backward pass), and a projection head (Miyato & Koyama 2018): the logit is
  ``dense(h) + <embedding(label), h>``, which conditions on the class without concatenating labels
  onto images.
- Loss: the non-saturating GAN loss, with one-sided label smoothing (real targets
  ``1 - label_smoothing``, fake targets 0; Salimans et al. 2016). Adam, lr 2e-4, beta_1 0.5.

Nothing in it is tied to a device: the same code runs on a GPU at 128 px (``GanConfig(image_size=128,
width=64)``). Randomness enters through ``GanConfig.seed`` (``keras.utils.set_random_seed``, the
initialisers' seeds and the noise of ``generate``). The training step uses TensorFlow's
GradientTape (the project's backend), as Keras' own DCGAN example does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from model import stored_json

__all__ = ["GENERATOR_FILES", "GanConfig", "Generator", "build_discriminator", "build_generator", "generate",
           "generator_from_files", "generator_to_files", "init_generator", "train_gan"]

GENERATOR_FILES = ("generator.keras", "gan.json")

_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class GanConfig:
    """Settings of the GAN and its training. ``width``: channels of the last generator block and of
    the first discriminator block (doubling towards 4x4, at most 8x). ``epochs`` passes over the
    images in batches of ``batch_size``."""

    image_size: int = 64
    noise_dim: int = 64
    width: int = 32
    embedding_dim: int = 16
    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 2e-4
    beta_1: float = 0.5
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size not in _SIZES:
            raise ValueError(f"image_size must be one of {_SIZES}, got {self.image_size}")
        for name in ("noise_dim", "width", "embedding_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be 0 or more, got {self.epochs}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def to_dict(self) -> dict:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GanConfig:
        if data.get("version") != 1:
            raise ValueError(f"unknown GAN config version {data.get('version')!r}")
        return cls(**{key: value for key, value in data.items() if key != "version"})


@dataclass
class Generator:
    """A trained (or untrained) generator: its network, the config it was built with, its number of
    classes (labels 0 .. num_classes - 1) and the mean losses per epoch (``history``)."""

    network: keras.Model
    config: GanConfig
    num_classes: int
    history: dict[str, list[float]] = field(default_factory=dict)


def _blocks(image_size: int) -> int:
    return int(np.log2(image_size // 4))  # 4x4 -> image_size, one doubling per block


def build_generator(config: GanConfig, num_classes: int) -> keras.Model:
    """(noise (n, noise_dim), label (n,) int) -> images (n, size, size, 1) in [-1, 1]."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    seed = config.seed * 100
    blocks = _blocks(config.image_size)
    channels = [config.width * min(2 ** (blocks - index), 8) for index in range(blocks + 1)]
    noise = keras.Input((config.noise_dim,), name="noise")
    label = keras.Input((), dtype="int32", name="label")
    embedded = keras.layers.Embedding(num_classes, config.embedding_dim, name="label_embedding",
                                      embeddings_initializer=keras.initializers.RandomNormal(seed=seed))(label)
    x = keras.layers.Concatenate(name="noise_and_label")([noise, embedded])
    x = keras.layers.Dense(4 * 4 * channels[0], use_bias=False, name="project",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)
    x = keras.layers.Reshape((4, 4, channels[0]), name="to_map")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="project_norm")(x)
    x = keras.layers.ReLU(name="project_relu")(x)
    for index in range(blocks):
        x = keras.layers.UpSampling2D(name=f"up{index}")(x)
        x = keras.layers.Conv2D(channels[index + 1], 3, padding="same", use_bias=False, name=f"conv{index}",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2 + index))(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"norm{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    image = keras.layers.Conv2D(1, 3, padding="same", activation="tanh", name="image",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 50))(x)
    return keras.Model([noise, label], image, name="generator")


def build_discriminator(config: GanConfig, num_classes: int) -> keras.Model:
    """(images (n, size, size, 1) in [-1, 1], label (n,) int) -> logit (n, 1), real > 0."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    seed = config.seed * 100 + 60
    blocks = _blocks(config.image_size)
    image = keras.Input((config.image_size, config.image_size, 1), name="image")
    label = keras.Input((), dtype="int32", name="label")
    x = image
    for index in range(blocks):
        convolution = keras.layers.Conv2D(config.width * min(2 ** index, 8), 4, strides=2, padding="same",
                                          kernel_initializer=keras.initializers.GlorotUniform(seed=seed + index))
        x = keras.layers.SpectralNormalization(convolution, name=f"conv{index}")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"lrelu{index}")(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    unconditional = keras.layers.SpectralNormalization(
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 30)), name="logit")(features)
    embedding = keras.layers.Embedding(num_classes, features.shape[-1], name="label_projection",
                                       embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02, seed=seed + 31))
    projected = keras.layers.Dot(axes=1, name="projection")([embedding(label), features])
    logit = keras.layers.Add(name="conditional_logit")([unconditional, projected])
    return keras.Model([image, label], logit, name="discriminator")


class _Gan(keras.Model):
    """The two networks and one adversarial training step (TensorFlow's GradientTape)."""

    def __init__(self, generator: keras.Model, discriminator: keras.Model, config: GanConfig):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.config = config
        self.seed_generator = keras.random.SeedGenerator(config.seed)
        self.bce = keras.losses.BinaryCrossentropy(from_logits=True)
        self.generator_optimizer = keras.optimizers.Adam(config.learning_rate, beta_1=config.beta_1)
        self.discriminator_optimizer = keras.optimizers.Adam(config.learning_rate, beta_1=config.beta_1)
        self.generator_loss_tracker = keras.metrics.Mean(name="generator_loss")
        self.discriminator_loss_tracker = keras.metrics.Mean(name="discriminator_loss")

    @property
    def metrics(self):
        return [self.generator_loss_tracker, self.discriminator_loss_tracker]

    def train_step(self, data):
        real, labels = data
        batch = tf.shape(real)[0]
        noise = keras.random.normal((batch, self.config.noise_dim), seed=self.seed_generator)
        real_targets = tf.fill((batch, 1), 1.0 - self.config.label_smoothing)  # one-sided smoothing
        with tf.GradientTape() as tape:
            fake = self.generator([noise, labels], training=True)
            real_logits = self.discriminator([real, labels], training=True)
            fake_logits = self.discriminator([fake, labels], training=True)
            discriminator_loss = (self.bce(real_targets, real_logits) + self.bce(tf.zeros_like(fake_logits), fake_logits))
        weights = self.discriminator.trainable_weights
        self.discriminator_optimizer.apply_gradients(zip(tape.gradient(discriminator_loss, weights), weights))
        noise = keras.random.normal((batch, self.config.noise_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fake_logits = self.discriminator([self.generator([noise, labels], training=True), labels], training=True)
            generator_loss = self.bce(tf.ones_like(fake_logits), fake_logits)  # non-saturating
        weights = self.generator.trainable_weights
        self.generator_optimizer.apply_gradients(zip(tape.gradient(generator_loss, weights), weights))
        self.generator_loss_tracker.update_state(generator_loss)
        self.discriminator_loss_tracker.update_state(discriminator_loss)
        return {metric.name: metric.result() for metric in self.metrics}


def _to_unit_range(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, s, s) -> float32 (n, size, size, 1) in [-1, 1]."""
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square grayscale uint8 images of shape (n, s, s), got {images.dtype} {images.shape}")
    if images.shape[1] != size:
        images = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])
    return (images.astype(np.float32) / 127.5 - 1.0)[..., None]


def init_generator(num_classes: int, config: GanConfig = GanConfig()) -> Generator:
    """An untrained generator, exactly as ``train_gan`` starts it with the same config (the baseline
    that training must beat)."""
    keras.utils.set_random_seed(config.seed)
    return Generator(build_generator(config, num_classes), config, num_classes)


def train_gan(images: np.ndarray, labels: np.ndarray, config: GanConfig = GanConfig(),
              num_classes: int | None = None, callbacks: Sequence[keras.callbacks.Callback] = ()) -> Generator:
    """Train the conditional GAN on grayscale uint8 images ``(n, s, s)`` (resized to
    ``config.image_size`` when s differs) with int labels ``0 .. num_classes - 1`` (by default
    ``max(labels) + 1``). Train on the training split only. ``callbacks`` see each epoch's mean
    losses (progress and logs)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be one int per image, got {labels.dtype} {labels.shape} for {len(images)} images")
    if len(images) == 0:
        raise ValueError("no images to train on")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1}, got {labels.min()} .. {labels.max()}")
    real = _to_unit_range(images, config.image_size)
    generator = init_generator(num_classes, config)
    gan = _Gan(generator.network, build_discriminator(config, num_classes), config)
    gan.compile()
    if config.epochs:
        history = gan.fit(real, labels.astype(np.int32), batch_size=config.batch_size, epochs=config.epochs,
                          shuffle=True, verbose=0, callbacks=list(callbacks))
        generator.history = {name: [float(value) for value in values] for name, values in history.history.items()}
    return generator


def generate(generator: Generator, label: int, count: int, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """``count`` synthetic images of class ``label`` as uint8 ``(count, size, size)``; the same seed
    gives the same images."""
    if not 0 <= label < generator.num_classes:
        raise ValueError(f"label must lie in 0 .. {generator.num_classes - 1}, got {label}")
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")
    size = generator.config.image_size
    noise = np.random.default_rng(seed).standard_normal((count, generator.config.noise_dim)).astype(np.float32)
    labels = np.full(count, label, np.int32)
    out = np.empty((count, size, size), np.uint8)
    for start in range(0, count, batch_size):
        stop = start + batch_size
        images = generator.network([noise[start:stop], labels[start:stop]], training=False)
        out[start:stop] = np.clip(np.rint((np.asarray(images)[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return out


def generator_to_files(generator: Generator) -> dict[str, bytes]:
    """The generator as bytes per file name (``GENERATOR_FILES``): the Keras network and ``gan.json``
    (config, number of classes, losses per epoch). What a store writes; the card is the caller's."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / GENERATOR_FILES[0]
        generator.network.save(path)
        network = path.read_bytes()
    about = {"config": generator.config.to_dict(), "num_classes": generator.num_classes, "history": generator.history}
    return {GENERATOR_FILES[0]: network, GENERATOR_FILES[1]: json.dumps(about, indent=2).encode("utf-8")}


def generator_from_files(files: dict[str, bytes], where: str = "") -> Generator:
    """The inverse of ``generator_to_files`` (Keras safe mode); checks that the network fits the config.
    Checking the bytes against a card's digests is the caller's (as ``model.bundle.check_file``);
    ``where`` (the folder the files lie in) names them in errors."""
    missing = [name for name in GENERATOR_FILES if name not in files]
    if missing:
        raise ValueError(f"generator files missing: {missing}")
    about = stored_json.loads(files[GENERATOR_FILES[1]], f"{where}/{GENERATOR_FILES[1]}" if where else GENERATOR_FILES[1])
    config, num_classes = GanConfig.from_dict(about["config"]), int(about["num_classes"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / GENERATOR_FILES[0]
        path.write_bytes(files[GENERATOR_FILES[0]])
        network = keras.saving.load_model(path, compile=False, safe_mode=True)
    size = config.image_size
    if tuple(network.output_shape) != (None, size, size, 1) or network.input_shape[0] != (None, config.noise_dim):
        raise ValueError(f"the network gives {network.output_shape} from {network.input_shape}, the config says "
                         f"{size} px from {config.noise_dim} noise dimensions")
    return Generator(network, config, num_classes, dict(about.get("history", {})))
