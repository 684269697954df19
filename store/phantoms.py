"""Synthetic chest phantoms for the demo and tests: two lungs, ribs, spine, noise; opacities for
the positive class. They need no data set and no licence, and a small network can learn them.

Options for validity tests: opacities in one lung only (to check where Grad-CAM looks), a bright
burned-in marker (the kind of source label a model can learn instead of disease), and a
``manifest.csv`` with a ``source`` column that either equals the label (a shortcut) or is
independent of it. Sides are named for the image as displayed, as in ``model.anatomy``:
``image_left`` is the patient's right lung on a frontal radiograph.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from imaging.raster import encode_png
from store import storage

__all__ = ["MARKER_BOX", "OPACITY_SIDES", "SOURCES", "chest_phantom", "write_phantom_dataset", "write_phantom_manifest"]

OPACITY_SIDES = {"image_left": -1, "image_right": 1}
# (top, bottom, left, right) as fractions: the top-left corner, above model.anatomy's lung boxes,
# where scanners and publications burn in labels.
MARKER_BOX = (0.02, 0.08, 0.03, 0.20)
SOURCES = ("label", "independent")
_INDEPENDENT_SOURCES = ("site-a", "site-b")


def chest_phantom(rng: np.random.Generator, size: int = 256, opacities: bool = False,
                  opacity_side: str | None = None, marker: bool = False) -> np.ndarray:
    """A grayscale uint8 chest-like image; ``opacities`` adds patchy bright areas in the lungs.

    ``opacity_side`` ('image_left' or 'image_right', the side of the IMAGE) puts every opacity in
    that lung; None spreads them over both. ``marker`` burns a bright bar into the top-left corner
    (``MARKER_BOX``). Neither option changes the random draws, so a seed gives the same anatomy
    with or without them.
    """
    if opacity_side is not None and opacity_side not in OPACITY_SIDES:
        raise ValueError(f"opacity_side must be one of {tuple(OPACITY_SIDES)} or None, got {opacity_side!r}")
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
            side = rng.choice([-1, 1])  # drawn even when overridden, to keep the random stream
            if opacity_side is not None:
                side = OPACITY_SIDES[opacity_side]
            centre = (int(size * (0.5 + side * rng.uniform(0.12, 0.25))), int(size * rng.uniform(0.35, 0.75)))
            radius = int(size * rng.uniform(0.04, 0.09))
            cv2.circle(image, centre, radius, float(rng.uniform(140, 190)), -1)
    image = cv2.GaussianBlur(image, (0, 0), size / 110)
    image += rng.normal(0, 9, image.shape).astype(np.float32)
    if marker:  # after blur and noise: burned-in text is crisp and noiseless
        top, bottom, left, right = MARKER_BOX
        image[int(size * top):max(int(size * bottom), int(size * top) + 1),
              int(size * left):max(int(size * right), int(size * left) + 1)] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def write_phantom_manifest(uri: str, rows: Sequence[Mapping[str, str]]) -> str:
    """Write ``manifest.csv`` under ``uri`` from one mapping per image (``file`` relative to ``uri``,
    ``class``, any extra columns); returns its URI. Columns: file, class, then the others in order of
    first appearance; a value a row lacks is left empty."""
    columns = ["file", "class"]
    for row in rows:
        columns += [name for name in row if name not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest_uri = storage.join(uri, "manifest.csv")
    storage.write_bytes(manifest_uri, text.getvalue().encode("utf-8"))
    return manifest_uri


def write_phantom_dataset(uri: str, per_class: int = 20, size: int = 256, seed: int = 0,
                          classes: tuple[str, str] = ("normal", "covid"), opacity_side: str | None = None,
                          marker_for: str | None = None, source: str | None = None) -> list[str]:
    """Class folders of PNG phantoms under ``uri`` (the second class has opacities); returns the URIs.

    ``opacity_side``: as in ``chest_phantom``. ``source``: None writes no manifest (class folders
    only); 'label' also writes a manifest.csv (file, class, patient_id, source) whose source equals
    the class, the shortcut of a data set assembled from one source per class; 'independent'
    alternates the sources 'site-a' and 'site-b' within each class, so the source says nothing of
    the label. ``marker_for``: images whose class, or whose source, equals it get the marker: with
    source='label' and marker_for='covid' the marker is both a class and a source property (a
    shortcut); with source='independent' and marker_for='site-a' it is independent of the label.
    """
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} or None, got {source!r}")
    rng = np.random.default_rng(seed)
    written, rows = [], []
    for index, label in enumerate(classes):
        for number in range(per_class):
            origin = label if source == "label" else _INDEPENDENT_SOURCES[number % 2] if source else None
            marker = marker_for is not None and marker_for in (label, origin)
            pixels = chest_phantom(rng, size, opacities=index == 1, opacity_side=opacity_side, marker=marker)
            name = f"{label}-{seed}-{number:04d}.png"
            uri_of_image = storage.join(uri, label, name)
            storage.write_bytes(uri_of_image, encode_png(pixels))
            written.append(uri_of_image)
            rows.append({"file": f"{label}/{name}", "class": label, "patient_id": f"{label}-{seed}-{number:04d}",
                         "source": origin})
    if source is not None:
        write_phantom_manifest(uri, rows)
    return written
