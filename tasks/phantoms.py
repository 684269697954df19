"""Synthetic chest phantoms for the demo and tests: two lungs, ribs, spine, noise; opacities for
the positive class. They need no data set and no licence, and a small network can learn them."""

from __future__ import annotations

import cv2
import numpy as np

from tasks import storage

__all__ = ["chest_phantom", "write_phantom_dataset"]


def chest_phantom(rng: np.random.Generator, size: int = 256, opacities: bool = False) -> np.ndarray:
    """A grayscale uint8 chest-like image; ``opacities`` adds patchy bright areas in the lungs."""
    image = np.full((size, size), 200, np.float32)  # soft tissue is bright on a radiograph
    centre_y = size * rng.uniform(0.50, 0.56)
    for side in (-1, 1):
        centre_x = size * (0.5 + side * rng.uniform(0.17, 0.21))
        axes = (int(size * rng.uniform(0.13, 0.16)), int(size * rng.uniform(0.27, 0.32)))
        cv2.ellipse(image, (int(centre_x), int(centre_y)), axes, 0, 0, 360, 55, -1)  # dark, air-filled lungs
    for rib in range(7):  # ribs: bright arcs across both lungs
        y = int(size * (0.28 + rib * 0.075 + rng.uniform(-0.01, 0.01)))
        cv2.ellipse(image, (size // 2, y), (int(size * 0.36), int(size * 0.05)), 0, 200, 340, 150, max(1, size // 90))
    cv2.rectangle(image, (int(size * 0.47), 0), (int(size * 0.53), size), 225, -1)  # spine
    if opacities:
        for _ in range(rng.integers(3, 7)):
            side = rng.choice([-1, 1])
            centre = (int(size * (0.5 + side * rng.uniform(0.12, 0.25))), int(size * rng.uniform(0.35, 0.75)))
            radius = int(size * rng.uniform(0.04, 0.09))
            cv2.circle(image, centre, radius, float(rng.uniform(140, 190)), -1)
    image = cv2.GaussianBlur(image, (0, 0), size / 110)
    image += rng.normal(0, 9, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_phantom_dataset(uri: str, per_class: int = 20, size: int = 256, seed: int = 0,
                          classes: tuple[str, str] = ("normal", "covid")) -> list[str]:
    """Class folders of PNG phantoms under ``uri`` (the second class has opacities); returns the URIs."""
    rng = np.random.default_rng(seed)
    written = []
    for index, label in enumerate(classes):
        for number in range(per_class):
            pixels = chest_phantom(rng, size, opacities=index == 1)
            ok, png = cv2.imencode(".png", pixels)
            assert ok
            uri_of_image = storage.join(uri, label, f"{label}-{seed}-{number:04d}.png")
            storage.write_bytes(uri_of_image, png.tobytes())
            written.append(uri_of_image)
    return written
