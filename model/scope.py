"""Is this what the model was trained on? An out-of-distribution score in the model's own features.

The score of an image is its Mahalanobis distance (Lee et al. 2018, "A Simple Unified Framework for
Detecting Out-of-Distribution Samples") from the training images, in the pooled block5 features
the forward pass computes anyway: the features' square roots (ReLU outputs are skewed; the root
makes them closer to Gaussian), centred on the training mean, under a Ledoit-Wolf shrunk
covariance (512 features from a few hundred images: the sample covariance is singular).

The threshold comes from images the fit has not seen: the training images are scored out of fold,
patients kept within a fold (an image's neighbours from the same patient would make it look more
typical than a new patient's), and the threshold is the conformal quantile of those scores, so a
new image like the training ones passes with probability at least ``pass_rate`` (Vovk et al.,
split conformal prediction: the ``ceil((n + 1) * pass_rate)``-th smallest of n scores).

Pure numpy and scikit-learn: ``tasks`` fits it at training and stores it in the bundle.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import GroupKFold

__all__ = [
    "PASS_RATE",
    "REASONS",
    "SCOPE_FILE",
    "SCOPE_PREFIX",
    "ScopeModel",
    "colourfulness",
    "fit_layout",
    "fit_scope",
    "fit_template",
    "pixel_reason",
    "scope_features",
    "template_matches",
    "thumbnail",
]

PASS_RATE = 0.99  # of real frontal chest X-rays like the training ones
SCOPE_FILE = "scope.npz"  # the bundle file ScopeModel.to_bytes writes
# Fewer images than this say too little about 512 features for their distance to refuse anything:
# the score is kept on every row, the threshold is infinite, and the pixel and layout checks decide.
MIN_FEATURE_IMAGES = 200
FOLDS = 5


def scope_features(maps: np.ndarray) -> np.ndarray:
    """block5_pool then global average pooling of last-convolution maps ``(n, h, w, c)``: the
    features the head reads, computed from the maps the forward pass returns."""
    n, height, width, channels = maps.shape
    pooled = maps[:, : height // 2 * 2, : width // 2 * 2].reshape(n, height // 2, 2, width // 2, 2, channels)
    return pooled.max(axis=(2, 4)).mean(axis=(1, 2)).astype(np.float32)


@dataclass(frozen=True)
class ScopeModel:
    mean: np.ndarray  # (features,) of the square-rooted training features
    precision: np.ndarray  # (features, features): the inverse of the shrunk covariance
    threshold: float  # scores above it are out of scope (infinite: too few training images to say)
    pass_rate: float  # what the threshold was chosen for
    calibration_images: int  # out-of-fold scores the threshold was chosen from
    template: np.ndarray | None = None  # (THUMBNAIL, THUMBNAIL): the upright training X-ray (fit_template)
    min_match: float | None = None  # the least correlation with it an upright chest X-ray has
    typical_match: float | None = None  # what 9 in 10 training X-rays reach: a turned copy must, to be named so

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` ``(n, features)`` from the training images."""
        centred = np.sqrt(np.maximum(np.asarray(features, np.float64), 0.0)) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def in_scope(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) <= self.threshold

    def judge(self, pixels: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Each image's score, and the key of ``REASONS`` it is refused for (None: in scope), from
        its resized pixels ``(n, h, w, 3)`` uint8 and pooled features ``(n, features)``."""
        scores = self.score(features)
        layout = None if self.template is None else (self.template, self.min_match, self.typical_match)
        reasons = [pixel_reason(image, layout) or ("features" if score > self.threshold else None)
                   for image, score in zip(pixels, scores)]
        return scores, reasons

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        extra = {} if self.template is None else {"template": self.template.astype(np.float32),
                                                  "min_match": np.float64(self.min_match),
                                                  "typical_match": np.float64(self.typical_match)}
        np.savez(buffer, mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32),
                 threshold=np.float64(self.threshold), pass_rate=np.float64(self.pass_rate),
                 calibration_images=np.int64(self.calibration_images), **extra)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "scope.npz") -> ScopeModel:
        """ValueError naming ``source`` for anything but a scope model's arrays, whole and finite."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in ("mean", "precision", "threshold", "pass_rate",
                                                          "calibration_images")}
                template = arrays["template"].astype(np.float64) if "template" in arrays.files else None
                min_match = float(arrays["min_match"]) if template is not None else None
                typical_match = float(arrays["typical_match"]) if template is not None else None
        except Exception as error:  # zip, npy and key errors all mean the same here
            raise ValueError(f"{source}: not a scope model ({type(error).__name__}: {error})") from error
        mean, precision = values["mean"].astype(np.float64), values["precision"].astype(np.float64)
        features = mean.shape[0] if mean.ndim == 1 else 0
        if not features or precision.shape != (features, features):
            raise ValueError(f"{source}: mean {mean.shape} and precision {precision.shape} do not fit together")
        scalars = [values[name] for name in ("threshold", "pass_rate", "calibration_images")]
        if any(value.shape != () for value in scalars) or not all(np.isfinite(mean)) \
                or not np.isfinite(precision).all() or not float(values["threshold"]) > 0 \
                or not 0 < float(values["pass_rate"]) < 1 or int(values["calibration_images"]) < 1:
            raise ValueError(f"{source}: values out of range")
        if template is not None and (template.shape != (THUMBNAIL, THUMBNAIL) or not np.isfinite(template).all()
                                     or not -1 <= min_match <= typical_match <= 1):
            raise ValueError(f"{source}: template {template.shape} is not a finite {THUMBNAIL} x {THUMBNAIL} image "
                             f"with least and typical matches in [-1, 1]")
        return cls(mean, precision, float(values["threshold"]), float(values["pass_rate"]),
                   int(values["calibration_images"]), template, min_match, typical_match)


def _fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rooted = np.sqrt(np.maximum(features, 0.0))
    estimate = LedoitWolf().fit(rooted)
    return estimate.location_, estimate.precision_


def fit_scope(features: np.ndarray, groups: np.ndarray | None = None, pass_rate: float = PASS_RATE,
              folds: int = FOLDS, pixels: np.ndarray | None = None) -> ScopeModel:
    """The scope of images like ``features`` ``(n, features)`` (``groups``: their patients), with a
    threshold that passes ``pass_rate`` of new such images (at least, by the conformal argument);
    ``pixels`` (the same images, resized uint8 RGB) give the orientation template."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < folds * 2:
        raise ValueError(f"the scope needs at least {folds * 2} images' features, got {features.shape}")
    if not 0 < pass_rate < 1:
        raise ValueError(f"pass_rate must lie between 0 and 1, got {pass_rate}")
    groups = np.arange(len(features)) if groups is None else np.asarray(groups)
    folds = min(folds, len(np.unique(groups)))
    if folds < 2:
        raise ValueError("the scope needs images of at least two patients")
    scores = np.empty(len(features))
    for fitted, held_out in GroupKFold(n_splits=folds).split(features, groups=groups):
        mean, precision = _fit(features[fitted])
        scores[held_out] = ScopeModel(mean, precision, math.inf, pass_rate, 1).score(features[held_out])
    rank = math.ceil((len(scores) + 1) * pass_rate)
    threshold = float(np.sort(scores)[rank - 1]) if rank <= len(scores) and len(scores) >= MIN_FEATURE_IMAGES \
        else math.inf
    mean, precision = _fit(features)
    layout = fit_layout(pixels, pass_rate) if pixels is not None else (None, None, None)
    return ScopeModel(mean, precision, threshold, pass_rate, len(scores), *layout)


# --- What the pixels say before the features are asked -------------------------------------------
# Cheap checks on the decoded image that name why an image is out of scope, where the feature score
# could only say that it is. Bounds are set beyond every real X-ray of the development set
# (bench/scope_bench.py measures them); the orientation template is fitted at training.

THUMBNAIL = 32  # side of the grayscale thumbnail the orientation check compares
SCOPE_PREFIX = "out of scope: "  # every reason below starts with it
REASONS = {
    "colour": "out of scope: colour image",
    "blank": "out of scope: blank image",
    "noise": "out of scope: noise",
    "inverted": "out of scope: inverted",
    "rotated": "out of scope: rotated",
    "partial view": "out of scope: partial view",
    "unlike": "out of scope: not a chest radiograph",  # nothing like an upright chest X-ray's layout
    "features": "out of scope: not a chest radiograph",  # the features lie far from the training images
}
MAX_COLOURFULNESS = 20.0  # Hasler and Suesstrunk's metric; grey X-rays with coloured arrows stay far below
MIN_SPREAD = 4.0  # grey levels: below it the image is flat
MIN_NEIGHBOUR_CORRELATION = 0.5  # neighbouring pixels of a radiograph agree; in noise they do not
ORIENTATION_MARGIN = 0.15  # how much better a turned or inverted image must match the template


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003): 0 for a grey image, 15-110 for photographs."""
    r, g, b = (rgb[..., index].astype(np.float32) for index in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def neighbour_correlation(grey: np.ndarray) -> float:
    """Correlation of each pixel with its right-hand neighbour: near 1 in any radiograph, near 0 in noise."""
    centred = grey - grey.mean()
    return float((centred[:, 1:] * centred[:, :-1]).mean() / max(float(centred.var()), 1e-6))


def thumbnail(rgb: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """Grey, ``side`` x ``side``, zero mean and unit spread (all zeros for a flat image)."""
    grey = cv2.resize(rgb.mean(axis=2).astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    spread = grey.std()
    return (grey - grey.mean()) / spread if spread > 1e-6 else np.zeros_like(grey)


def orientations(small: np.ndarray) -> dict[str, np.ndarray]:
    """The thumbnail as it is, turned and inverted: what the template is matched against."""
    turned = {"as is": small, "rotated 90": np.rot90(small, 1), "rotated 180": np.rot90(small, 2),
              "rotated 270": np.rot90(small, 3)}
    return {**turned, **{f"inverted, {name}" if name != "as is" else "inverted": -image
                         for name, image in turned.items()}}


def fit_template(thumbnails: np.ndarray) -> np.ndarray:
    """The mean training thumbnail, standardised: what an upright, ordinary X-ray looks like."""
    mean = thumbnails.mean(axis=0)
    return (mean - mean.mean()) / max(float(mean.std()), 1e-6)


def fit_layout(pixels: np.ndarray, pass_rate: float = PASS_RATE) -> tuple[np.ndarray, float, float]:
    """The template of upright training X-rays (``pixels``: resized uint8 RGB), the least
    correlation with it that passes (the conformal lower quantile at half the false rejections
    ``pass_rate`` allows: the feature score takes the other half), and the 10th percentile of the
    training images' correlations, which an inverted, turned or cut image must reach in its
    corrected form to be refused under that name rather than as not a chest radiograph."""
    thumbnails = np.stack([thumbnail(image) for image in pixels])
    template = fit_template(thumbnails)
    matches = np.sort([float((small * template).mean()) for small in thumbnails])
    rank = math.floor((len(matches) + 1) * (1 - pass_rate) / 2)
    # Too few images for the rate: no order statistic guarantees it; a little below the least.
    least = float(matches[rank - 1]) if rank >= 1 else float(matches[0]) - 0.05
    return template, least, max(least, float(np.percentile(matches, 10)))


def template_matches(small: np.ndarray, template: np.ndarray) -> dict[str, float]:
    """Correlation of each orientation of ``small`` with ``template``."""
    return {name: float((image * template).mean()) for name, image in orientations(small).items()}


def pixel_reason(rgb: np.ndarray, layout: tuple[np.ndarray, float, float] | None = None) -> str | None:
    """The key of ``REASONS`` the pixels alone give for refusing ``rgb`` (uint8, h x w x 3), or None.
    With ``layout`` (``fit_layout``'s template, least and typical match), the orientation and the
    likeness to an upright chest X-ray are asked too."""
    if colourfulness(rgb) > MAX_COLOURFULNESS:
        return "colour"
    grey = rgb.mean(axis=2)
    if grey.std() < MIN_SPREAD:
        return "blank"
    if neighbour_correlation(grey) < MIN_NEIGHBOUR_CORRELATION:
        return "noise"
    if layout is None:
        return None
    template, least, typical = layout
    small = thumbnail(rgb)
    matches = template_matches(small, template)
    best = max(matches, key=matches.get)
    if best != "as is" and matches[best] >= typical and matches[best] - matches["as is"] > ORIENTATION_MARGIN:
        return "inverted" if best.startswith("inverted") else "rotated"
    if matches["as is"] >= least:
        return None
    return "partial view" if _corner_match(small, template) >= typical else "unlike"


CORNER_FRACTIONS = (0.35, 0.5)  # sides of the corners of the template a partial view is matched to


def _corner_match(small: np.ndarray, template: np.ndarray) -> float:
    """The best correlation of ``small`` with a corner of the template, scaled up to its size."""
    side, best = template.shape[0], -1.0
    for fraction in CORNER_FRACTIONS:
        part = max(2, round(side * fraction))
        for top, left in ((0, 0), (0, side - part), (side - part, 0), (side - part, side - part)):
            corner = cv2.resize(np.ascontiguousarray(template[top : top + part, left : left + part]), (side, side),
                                interpolation=cv2.INTER_LINEAR)
            spread = corner.std()
            if spread > 1e-6:
                best = max(best, float((small * (corner - corner.mean()) / spread).mean()))
    return best
