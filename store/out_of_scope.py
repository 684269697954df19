"""A varied set of images a chest X-ray screener must not score: for the scope gate's rates.

Kinds, each the reason the gate should give (``model.scope``'s vocabulary):

- ``photograph``: natural photographs that ship with scikit-learn and matplotlib (a Chinese temple,
  a flower, Grace Hopper, a product shot), cropped, scaled and flipped into varied views.
- ``document``: pages of printed text and tables, as a scanned request form would be.
- ``other modality``: an MRI slice of a head (matplotlib's sample data) and CT-like cross-sections
  (an ellipse body with organs and bone, the Shepp-Logan idea), in grayscale as a PACS sends them.
- ``blank or noise``: flat images, a gradient, pure noise.
- ``inverted``, ``rotated``, ``partial view``: real chest X-rays (given) inverted, turned by 90 or
  180 degrees, and cut to one corner.

Everything is made from files already installed and a seed: no download, no licence question
beyond those packages'. The sample photographs are few, so their views repeat content; that is
stated wherever rates on them are reported.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from imaging.raster import encode_png
from store import storage

__all__ = ["KINDS", "out_of_scope_images", "write_out_of_scope_set"]

KINDS = ("photograph", "document", "other modality", "blank or noise", "inverted", "rotated", "partial view")


def _sample_photographs() -> list[np.ndarray]:
    import matplotlib
    import sklearn.datasets

    folders = [Path(sklearn.datasets.__file__).parent / "images",
               Path(matplotlib.get_data_path()) / "sample_data"]
    names = ["china.jpg", "flower.jpg", "grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"]
    photos = []
    for name in names:
        path = next((folder / name for folder in folders if (folder / name).exists()), None)
        image = None if path is None else cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            photos.append(image)
    if not photos:
        raise FileNotFoundError("no sample photographs found in scikit-learn's or matplotlib's data")
    return photos


def _mri_slice() -> np.ndarray:
    import matplotlib

    raw = gzip.decompress((Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read_bytes())
    image = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float32)
    return np.uint8(np.clip(image / np.percentile(image, 99.5) * 255, 0, 255))


def _view(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """A random crop (40-100 % of the shorter side), maybe mirrored, scaled to ``size``."""
    height, width = image.shape[:2]
    side = int(min(height, width) * rng.uniform(0.4, 1.0))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    crop = image[top : top + side, left : left + side]
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


def _document(rng: np.random.Generator, size: int) -> np.ndarray:
    page = np.full((size, size), 245 - rng.integers(0, 20), np.uint8)
    words = ["REQUEST", "Patient", "Name", "Date", "Ward", "Clinical", "details", "Signature", "X-ray", "chest",
             "cough", "fever", "history", "Dr", "No.", "Consent", "Form", "Department", "Radiology", "Report"]
    y, scale = int(size * 0.08), size / 512
    while y < size * 0.95:
        if rng.random() < 0.15:  # a table rule
            cv2.line(page, (int(size * 0.05), y), (int(size * 0.95), y), 30, max(1, int(2 * scale)))
        else:
            line = " ".join(rng.choice(words, rng.integers(3, 8)))
            cv2.putText(page, line, (int(size * 0.05), y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, 20,
                        max(1, int(scale)), cv2.LINE_AA)
        y += int(size * rng.uniform(0.04, 0.07))
    return page


def _cross_section(rng: np.random.Generator, size: int) -> np.ndarray:
    """A CT-like axial slice: an elliptical body, organs of different density, a ring of bone."""
    image = np.zeros((size, size), np.float32)
    centre = (size // 2 + int(rng.integers(-size // 20, size // 20)), size // 2)
    axes = (int(size * rng.uniform(0.38, 0.46)), int(size * rng.uniform(0.28, 0.36)))
    cv2.ellipse(image, centre, axes, 0, 0, 360, 0.45, -1)
    for _ in range(rng.integers(3, 7)):
        organ_centre = (centre[0] + int(rng.normal(0, axes[0] / 3)), centre[1] + int(rng.normal(0, axes[1] / 3)))
        organ_axes = (int(size * rng.uniform(0.04, 0.12)), int(size * rng.uniform(0.04, 0.10)))
        cv2.ellipse(image, organ_centre, organ_axes, float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0.2, 0.7)), -1)
    cv2.ellipse(image, (centre[0], centre[1] + axes[1] - size // 12), (size // 18, size // 22), 0, 0, 360, 1.0, -1)
    cv2.ellipse(image, centre, axes, 0, 200, 340, 0.95, max(2, size // 60))
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.uint8(np.clip(image, 0, 1) * 255)


def _blank_or_noise(rng: np.random.Generator, size: int, index: int) -> np.ndarray:
    kind = index % 3
    if kind == 0:
        return np.full((size, size), int(rng.integers(0, 256)), np.uint8)
    if kind == 1:
        return np.uint8(np.tile(np.linspace(rng.integers(0, 100), rng.integers(150, 256), size), (size, 1)))
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def _transformed(rng: np.random.Generator, xray: np.ndarray, kind: str, size: int) -> np.ndarray:
    gray = xray if xray.ndim == 2 else cv2.cvtColor(xray, cv2.COLOR_BGR2GRAY)
    if kind == "inverted":
        out = 255 - gray
    elif kind == "rotated":
        out = np.rot90(gray, k=int(rng.choice([1, 2, 3])))
    else:  # partial view: one corner, a quarter of the image or less
        height, width = gray.shape
        fraction = rng.uniform(0.3, 0.45)
        top = 0 if rng.random() < 0.5 else height - int(height * fraction)
        left = 0 if rng.random() < 0.5 else width - int(width * fraction)
        out = gray[top : top + int(height * fraction), left : left + int(width * fraction)]
    return cv2.resize(np.ascontiguousarray(out), (size, size), interpolation=cv2.INTER_AREA)


def out_of_scope_images(per_kind: int, xrays: Sequence[np.ndarray] = (), size: int = 256,
                        seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``(kind, image)`` pairs, ``per_kind`` of each kind (uint8, grayscale or BGR); the kinds made
    from X-rays only where ``xrays`` are given."""
    rng = np.random.default_rng(seed)
    photos, mri = _sample_photographs(), _mri_slice()
    # Each kind goes through the X-rays in its own order: no image twice while others are unused.
    orders = {kind: rng.permutation(len(xrays)) for kind in ("inverted", "rotated", "partial view")} if xrays else {}
    made: list[tuple[str, np.ndarray]] = []
    for index in range(per_kind):
        made.append(("photograph", _view(rng, photos[index % len(photos)], size)))
        made.append(("document", _document(rng, size)))
        made.append(("other modality", _view(rng, mri, size) if index % 2 else _cross_section(rng, size)))
        made.append(("blank or noise", _blank_or_noise(rng, size, index)))
        if xrays:
            for kind in ("inverted", "rotated", "partial view"):
                made.append((kind, _transformed(rng, xrays[orders[kind][index % len(xrays)]], kind, size)))
    return made


def write_out_of_scope_set(uri: str, per_kind: int, xrays: Sequence[np.ndarray] = (), size: int = 256,
                           seed: int = 0) -> dict[str, int]:
    """The set as PNGs under ``uri``, one folder per kind (named with '-' for spaces); the count per kind."""
    counts: dict[str, int] = {}
    for kind, image in out_of_scope_images(per_kind, xrays, size, seed):
        number = counts.get(kind, 0)
        storage.write_bytes(storage.join(uri, kind.replace(" ", "-"), f"{number:04d}.png"), encode_png(image))
        counts[kind] = number + 1
    return counts
