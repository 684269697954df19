"""Augmentation with Keras preprocessing layers, on [0, 1] images of the model's input size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras

__all__ = ["Augmentation", "build_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    rotation_degrees: float = 10.0
    shift: float = 0.05  # fraction of the side
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    # Off by default: the heart sits on the left, so a mirrored film is not a plausible X-ray.
    horizontal_flip: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def build_augmentation(config: Augmentation, seed: int = 0) -> keras.Sequential:
    layers = [
        keras.layers.RandomRotation(config.rotation_degrees / 360.0, fill_mode="constant", seed=seed),
        keras.layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomBrightness(config.brightness, value_range=(0.0, 1.0), seed=seed + 3),
        keras.layers.RandomContrast(config.contrast, value_range=(0.0, 1.0), seed=seed + 4),
    ]
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(layers, name="augmentation")
