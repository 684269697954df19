"""The preprocessing contract shared by training and screening.

An RGB uint8 image is resized to the model's input size (``resize``), then scaled (``scale``):
``unit`` maps to [0, 1] as in the founding paper; ``caffe`` is Keras' VGG16 ImageNet scaling
(BGR, mean-subtracted, 0-255). Augmentation runs between the two, on [0, 1] images, so both
steps are the same functions whether or not a model is being trained. The model card records
the ``Preprocessing`` it was trained with and screening refuses any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = ["SCALE_MODES", "Preprocessing", "preprocess", "resize", "scale"]

SCALE_MODES = ("unit", "caffe")
# Keras' VGG16 ImageNet means, in BGR order.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


@dataclass(frozen=True)
class Preprocessing:
    input_size: int = 224
    scale_mode: str = "unit"
    interpolation: str = "area"  # cv2.INTER_AREA: the right filter for downscaling

    def __post_init__(self) -> None:
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if not 32 <= self.input_size <= 1024:
            raise ValueError(f"input_size must be between 32 and 1024 (VGG16's minimum is 32), got {self.input_size}")
        if self.interpolation != "area":
            raise ValueError(f"interpolation must be 'area', got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        if data.get("version") != 1:
            raise ValueError(f"unknown preprocessing version {data.get('version')!r}")
        return cls(**{k: v for k, v in data.items() if k != "version"})


def resize(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """An RGB uint8 image of any size to ``(input_size, input_size, 3)`` uint8, ignoring aspect ratio
    as the founding paper does."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (h, w, 3), got {image.dtype} {image.shape}")
    size = (spec.input_size, spec.input_size)
    if image.shape[:2] == size:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def scale(images01, spec: Preprocessing):
    """[0, 1] float32 images (any leading shape; NumPy arrays or tensors) to what the network takes."""
    if spec.scale_mode == "unit":
        return images01
    return images01[..., ::-1] * 255.0 - _CAFFE_MEAN_BGR


def preprocess(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """One decoded RGB uint8 image to one network input, float32 ``(size, size, 3)``."""
    return scale(resize(image, spec).astype(np.float32) / 255.0, spec)
