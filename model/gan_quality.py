"""How good and how private a generator's images are (#14): fidelity and memorisation, measured.

- Fidelity: the Fréchet distance (FD) between two image sets in a feature space (Heusel et al. 2017,
  the FID's formula). The feature space is a function, images in, vectors out; the project's is the
  frozen VGG16 base's globally pooled features (``vgg16_features``), the space the classifier reads.
  An FD means little alone: compare it with the ``floor``, the FD between two halves of the real
  images, which is what sampling alone costs at that number of images.
- Memorisation: for each synthetic image the distance to its nearest real training image, in pixels
  (root mean square over [0, 1] pixels) and in features, against the real images' own nearest-
  neighbour distances (leave-one-out: each real image to the nearest *other* one).
  ``memorisation_check`` refuses a generator when a low quantile of its images' distances lies below
  ``margin`` times the same quantile of the real-to-real ones: some synthetic images are closer to a
  patient's image than patients' images are to each other, that is, copies (a privacy leak).

Pure NumPy (and Keras for ``vgg16_features``); nothing here reads storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from model.preprocessing import Preprocessing, resize, scale

__all__ = ["FeatureFunction", "MemorisationReport", "fd_against_floor", "fd_floor", "frechet_distance", "frechet_distance_of",
           "memorisation_check", "nearest_neighbour_distances", "pixel_vectors", "vgg16_features"]

FeatureFunction = Callable[[np.ndarray], np.ndarray]  # uint8 images (n, s, s) -> features (n, d)
SUMMARY_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5)


def vgg16_features(base: keras.Model, spec: Preprocessing, batch_size: int = 32) -> FeatureFunction:
    """The frozen base's pooled features as a feature function: grayscale uint8 ``(n, s, s)`` ->
    float64 ``(n, channels)``, each image resized and scaled by the training contract ``spec``
    (gray repeated into RGB) and its feature map averaged over space, as the classifier's head does."""
    if base.input_shape[1] != spec.input_size:
        raise ValueError(f"the base takes {base.input_shape[1]} px, the preprocessing {spec.input_size} px")

    def features(images: np.ndarray) -> np.ndarray:
        _check_images(images)
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([resize(np.repeat(image[..., None], 3, axis=-1), spec)
                              for image in images[start:start + batch_size]])
            maps = base(scale(batch.astype(np.float32) / 255.0, spec), training=False)
            out.append(np.asarray(maps).mean(axis=(1, 2)))
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, base.output_shape[-1]))

    return features


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, s, s)`` -> ``(n, s*s)`` in [0, 1] divided by sqrt(s*s), so Euclidean distances
    between them are root-mean-square pixel differences (comparable across image sizes)."""
    _check_images(images)
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return flat / np.sqrt(flat.shape[1])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets ``(n, d)``."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"expected two (n, d) feature sets of the same d, got {features_a.shape} and {features_b.shape}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("each set needs at least 2 images for a covariance")
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # Tr((C_a C_b)^(1/2)) = Tr((A C_b A)^(1/2)) with A = C_a^(1/2): a symmetric positive semi-definite
    # matrix, whose eigenvalues are real and >= 0 (clipped against rounding), even when singular
    # (fewer images than dimensions), where scipy's general sqrtm warns and may return complex values.
    values, vectors = np.linalg.eigh(covariance_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ covariance_b @ root_a), 0.0, None)).sum())
    distance = float(np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a) + np.trace(covariance_b) - 2.0 * trace_root)
    return max(distance, 0.0)  # rounding can leave a tiny negative for identical sets


def frechet_distance_of(images_a: np.ndarray, images_b: np.ndarray, features: FeatureFunction) -> float:
    """The FD between two uint8 image sets in the feature space ``features``."""
    return frechet_distance(features(images_a), features(images_b))


def fd_floor(real_images: np.ndarray, features: FeatureFunction, seed: int = 0) -> float:
    """The FD between two random halves of the real images: the FD that sampling alone gives. A
    generator whose FD to real images (at the same number of images) is near it is as close as can
    be told."""
    order = np.random.default_rng(seed).permutation(len(real_images))
    half = len(order) // 2
    return frechet_distance_of(real_images[order[:half]], real_images[order[half:2 * half]], features)


def fd_against_floor(synthetic: np.ndarray, real: np.ndarray, features: FeatureFunction, seed: int = 0) -> dict:
    """The generator's FD and its floor at the same numbers of images, so the two compare: the real
    images are cut into two random halves A and B; the floor is FD(A, B) and the generator's FD is
    FD(S, B) with S the first |A| synthetic images (the FD's bias grows as sets shrink, so sizes must
    match). Returns ``{"fd", "floor", "ratio", "images"}`` (``images``: |A|)."""
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(order) // 2
    if half < 2 or len(synthetic) < half:
        raise ValueError(f"need at least 4 real images and as many synthetic images as half of them, got "
                         f"{len(real)} real and {len(synthetic)} synthetic")
    first, second = features(real[order[:half]]), features(real[order[half:2 * half]])
    floor = frechet_distance(first, second)
    distance = frechet_distance(features(synthetic[:half]), second)
    return {"fd": distance, "floor": floor, "ratio": distance / floor if floor > 0 else None, "images": half}


def nearest_neighbour_distances(queries: np.ndarray, references: np.ndarray, leave_one_out: bool = False,
                                groups: np.ndarray | None = None) -> np.ndarray:
    """For each row of ``queries`` ``(n, d)`` the Euclidean distance to the nearest row of
    ``references`` ``(m, d)``. ``leave_one_out``: queries are the references, each skips itself and,
    with ``groups`` (one patient id per row), every row of its own group: a patient's follow-up
    images are near copies of each other and would make real-to-real distances look small."""
    queries, references = np.asarray(queries, np.float64), np.asarray(references, np.float64)
    if leave_one_out and queries.shape != references.shape:
        raise ValueError("leave_one_out needs the queries to be the references")
    if len(references) < (2 if leave_one_out else 1):
        raise ValueError("not enough reference images")
    squared = ((queries ** 2).sum(axis=1)[:, None] + (references ** 2).sum(axis=1)[None, :]
               - 2.0 * queries @ references.T)
    if leave_one_out:
        np.fill_diagonal(squared, np.inf)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (len(references),):
                raise ValueError(f"groups must hold one id per reference, got shape {groups.shape}")
            squared[groups[:, None] == groups[None, :]] = np.inf
            if np.isinf(squared).all(axis=1).any():
                raise ValueError("every reference must have another group to compare with")
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


@dataclass
class MemorisationReport:
    """The verdict (``passed``), why not (``reasons``), and per space ('pixels', 'features') the
    synthetic-to-real and real-to-real nearest-neighbour distances."""

    passed: bool
    reasons: list[str]
    quantile: float
    margin: float
    synthetic_distances: dict[str, np.ndarray] = field(default_factory=dict)
    real_distances: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready summary: the verdict and the distributions' quantiles per space."""
        def summary(values: np.ndarray) -> dict:
            return {f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in SUMMARY_QUANTILES}
        return {"passed": self.passed, "reasons": list(self.reasons), "quantile": self.quantile, "margin": self.margin,
                "spaces": {space: {"synthetic_to_real": summary(self.synthetic_distances[space]),
                                   "real_to_real": summary(self.real_distances[space])}
                           for space in self.synthetic_distances}}


def memorisation_check(synthetic: np.ndarray, real_train: np.ndarray, features: FeatureFunction | None = None,
                       quantile: float = 0.05, margin: float = 0.8,
                       patients: np.ndarray | None = None) -> MemorisationReport:
    """Refuse a generator whose images are closer to real training images than those are to each other.

    ``synthetic`` and ``real_train``: uint8 ``(n, s, s)`` of one size (the generator's; the real
    images of the class it was trained on, training split). In pixels and, with ``features``, in
    that feature space: fails when the ``quantile`` of the synthetic images' nearest-neighbour
    distances is below ``margin`` times the same quantile of the real images' leave-one-out ones.
    ``margin`` < 1 leaves room for the sampling noise of a low quantile of a few hundred distances
    (a real held-out image passes); copies, even noised ones, lie far below it. ``patients``: one
    patient id per real image; real-to-real distances then skip the image's own patient (pass them:
    without, a data set with follow-up images or duplicates has near-zero real-to-real distances and
    the check can refuse nothing).
    """
    if not 0.0 <= quantile <= 0.5:
        raise ValueError(f"quantile must be in [0, 0.5], got {quantile}")
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    _check_images(synthetic)
    _check_images(real_train)
    if synthetic.shape[1:] != real_train.shape[1:]:
        raise ValueError(f"synthetic images are {synthetic.shape[1:]}, real ones {real_train.shape[1:]}: resize first")
    spaces: dict[str, tuple[np.ndarray, np.ndarray]] = {"pixels": (pixel_vectors(synthetic), pixel_vectors(real_train))}
    if features is not None:
        spaces["features"] = (features(synthetic), features(real_train))
    report = MemorisationReport(True, [], quantile, margin)
    for space, (synthetic_vectors, real_vectors) in spaces.items():
        to_real = nearest_neighbour_distances(synthetic_vectors, real_vectors)
        real_to_real = nearest_neighbour_distances(real_vectors, real_vectors, leave_one_out=True, groups=patients)
        report.synthetic_distances[space], report.real_distances[space] = to_real, real_to_real
        synthetic_q, real_q = float(np.quantile(to_real, quantile)), float(np.quantile(real_to_real, quantile))
        if synthetic_q < margin * real_q:
            report.passed = False
            closest = int(np.argmin(to_real))
            report.reasons.append(
                f"{space}: the {quantile:.0%} quantile of synthetic-to-real nearest-neighbour distances is "
                f"{synthetic_q:.4g}, below {margin:g} x the real-to-real one ({real_q:.4g}); "
                f"{int((to_real < margin * real_q).sum())} of {len(to_real)} synthetic images are that close "
                f"(closest: image {closest}, {to_real[closest]:.4g})")
        # The quantile alone lets a few exact copies through (up to the quantile's share of the
        # images); a single image closer to a real one than any two patients' images are is one.
        floor = margin * float(real_to_real.min())
        too_close = int((to_real < floor).sum())
        if too_close:
            report.passed = False
            closest = int(np.argmin(to_real))
            report.reasons.append(
                f"{space}: {too_close} of {len(to_real)} synthetic images lie closer to a real training image than "
                f"{margin:g} x the smallest real-to-real distance ({floor:.4g}); closest: image {closest}, "
                f"{to_real[closest]:.4g}")
    return report


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected grayscale uint8 images of shape (n, s, s), got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
