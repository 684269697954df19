"""A fixed prior for where the lungs are on a frontal chest X-ray resized to a square.

Two boxes, as fractions of the image's width and height:

    side          rows (top, bottom)   columns (left, right)
    image_left    0.10 .. 0.92         0.08 .. 0.50
    image_right   0.10 .. 0.92         0.50 .. 0.92

Sides are named for the IMAGE as displayed, not the patient. A PA or AP radiograph is shown as if
the patient faced the viewer, so ``image_left`` holds the patient's RIGHT lung and ``image_right``
the patient's LEFT lung (the heart's side).

Why these numbers: on frontal radiographs resized to a square (as ``model.preprocessing.resize``
does, ignoring aspect ratio), the apices lie about a tenth of the way down, the costophrenic
angles at about 0.85-0.9, and the lateral chest walls about 0.08-0.1 in from each edge. The boxes
meet at the midline because a box cannot leave out the mediastinum without also cutting off the
medial lungs; they therefore include the spine and heart, and the prior is coarse by design. For
``store.phantoms.chest_phantom`` the lungs are ellipses centred at x = 0.5 -/+ (0.17 to 0.21),
y = 0.50 to 0.56, with half-axes 0.13 to 0.16 wide and 0.27 to 0.32 tall: they span x 0.13-0.49
and 0.51-0.87, y 0.18-0.88, inside the boxes with a margin of at least 0.04 (a few pixels even at
64 px) everywhere but at the midline.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["LUNG_BOXES", "SIDES", "lung_mask", "lung_share", "mask_images", "resized"]

# side -> (top, bottom, left, right), fractions of height and width
LUNG_BOXES: dict[str, tuple[float, float, float, float]] = {
    "image_left": (0.10, 0.92, 0.08, 0.50),
    "image_right": (0.10, 0.92, 0.50, 0.92),
}
SIDES = tuple(LUNG_BOXES)


def _box_mask(height: int, width: int, side: str | None) -> np.ndarray:
    """Pixels whose centre lies in the box(es): exact at any resolution, no resampling artefacts."""
    if side is not None and side not in LUNG_BOXES:
        raise ValueError(f"side must be one of {SIDES} or None, got {side!r}")
    rows = (np.arange(height) + 0.5) / height
    columns = (np.arange(width) + 0.5) / width
    mask = np.zeros((height, width), bool)
    for name, (top, bottom, left, right) in LUNG_BOXES.items():
        if side is None or side == name:
            mask |= ((rows >= top) & (rows < bottom))[:, None] & ((columns >= left) & (columns < right))[None, :]
    return mask


def lung_mask(size: int, side: str | None = None) -> np.ndarray:
    """Boolean ``(size, size)`` mask of both lung fields, or of one (``side``: 'image_left' or 'image_right')."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    return _box_mask(size, size, side)


def mask_images(images_uint8: np.ndarray, keep: str, fill: str | int = "mean") -> np.ndarray:
    """Copies of ``(n, h, w[, channels])`` uint8 images with part blanked.

    ``keep='outside'`` blanks the lung fields (can the model still tell the classes apart from what
    lies outside the lungs? then it uses something other than the lungs); ``keep='lungs'`` blanks
    everything else. ``fill='mean'`` paints each image's own mean grey (over all its pixels and
    channels), so the blanked area adds no brightness the class could be read from; an int paints
    that constant.
    """
    if keep not in ("outside", "lungs"):
        raise ValueError(f"keep must be 'outside' or 'lungs', got {keep!r}")
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (n, h, w[, channels]), got {images.dtype} {images.shape}")
    if fill != "mean" and not (isinstance(fill, (int, np.integer)) and 0 <= fill <= 255):
        raise ValueError(f"fill must be 'mean' or an int in 0..255, got {fill!r}")
    lungs = _box_mask(images.shape[1], images.shape[2], None)
    blank = lungs if keep == "outside" else ~lungs
    masked = images.copy()
    for index, image in enumerate(masked):
        value = int(round(float(images[index].mean()))) if fill == "mean" else int(fill)
        image[blank] = value
    return masked


def lung_share(cam: np.ndarray, side: str | None = None) -> float:
    """Share of a non-negative map's mass (a Grad-CAM, say) inside the lung boxes (or one of them),
    at the map's own resolution. NaN for a map with no mass, where the share is undefined."""
    cam = np.asarray(cam, float)
    if cam.ndim != 2:
        raise ValueError(f"expected a (h, w) map, got shape {cam.shape}")
    if (cam < 0).any():
        raise ValueError("the map must be non-negative")
    total = cam.sum()
    if total <= 0:
        return float("nan")
    return float(cam[_box_mask(*cam.shape, side)].sum() / total)


def resized(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map in [0, 1] at ``size`` (height, width), bilinear: how maps are shown and measured at the
    input's resolution."""
    return np.clip(cv2.resize(np.asarray(cam, np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
