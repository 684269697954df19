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

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import GroupKFold

__all__ = ["PASS_RATE", "ScopeModel", "fit_scope", "scope_features"]

PASS_RATE = 0.99  # of real frontal chest X-rays like the training ones
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
    threshold: float  # scores above it are out of scope
    pass_rate: float  # what the threshold was chosen for
    calibration_images: int  # out-of-fold scores the threshold was chosen from

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` ``(n, features)`` from the training images."""
        centred = np.sqrt(np.maximum(np.asarray(features, np.float64), 0.0)) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def in_scope(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) <= self.threshold

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32),
                 threshold=np.float64(self.threshold), pass_rate=np.float64(self.pass_rate),
                 calibration_images=np.int64(self.calibration_images))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "scope.npz") -> ScopeModel:
        """ValueError naming ``source`` for anything but a scope model's arrays, whole and finite."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in ("mean", "precision", "threshold", "pass_rate",
                                                          "calibration_images")}
        except Exception as error:  # zip, npy and key errors all mean the same here
            raise ValueError(f"{source}: not a scope model ({type(error).__name__}: {error})") from error
        mean, precision = values["mean"].astype(np.float64), values["precision"].astype(np.float64)
        features = mean.shape[0] if mean.ndim == 1 else 0
        if not features or precision.shape != (features, features):
            raise ValueError(f"{source}: mean {mean.shape} and precision {precision.shape} do not fit together")
        scalars = [values[name] for name in ("threshold", "pass_rate", "calibration_images")]
        if any(value.shape != () for value in scalars) or not all(np.isfinite(mean)) \
                or not np.isfinite(precision).all() or not math.isfinite(float(values["threshold"])) \
                or not 0 < float(values["pass_rate"]) < 1 or int(values["calibration_images"]) < 1:
            raise ValueError(f"{source}: values out of range")
        return cls(mean, precision, float(values["threshold"]), float(values["pass_rate"]),
                   int(values["calibration_images"]))


def _fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rooted = np.sqrt(np.maximum(features, 0.0))
    estimate = LedoitWolf().fit(rooted)
    return estimate.location_, estimate.precision_


def fit_scope(features: np.ndarray, groups: np.ndarray | None = None, pass_rate: float = PASS_RATE,
              folds: int = FOLDS) -> ScopeModel:
    """The scope of images like ``features`` ``(n, features)`` (``groups``: their patients), with a
    threshold that passes ``pass_rate`` of new such images (at least, by the conformal argument)."""
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
    # Fewer scores than the rate needs (rank > n): no finite threshold guarantees it; take the largest.
    threshold = float(np.sort(scores)[min(rank, len(scores)) - 1])
    mean, precision = _fit(features)
    return ScopeModel(mean, precision, threshold, pass_rate, len(scores))
