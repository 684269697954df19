"""Does tonight look like the reference? Two-sample tests and one drift score with an alarm rule.

Each test compares one quantity of tonight's images with the same quantity of a reference (the
model's test split, or the site's last accepted nights), as CheXstray does (Soin et al. 2022):
continuous quantities (probabilities, scope scores, image statistics) by the two-sample
Kolmogorov-Smirnov test, categories (rejection reasons, DICOM header values, pixel-spacing bins)
and shares (the share rejected) by the chi-squared test of the 2 x k table. Every test gives a
statistic and a p-value.

The drift score is the Bonferroni-adjusted evidence against "nothing changed": with m tests and
the smallest p-value p, ``score = -log10(min(1, m * p))``. A test alarms when its adjusted p-value
``m * p`` is below ALPHA, and the run when any test does, i.e. when the score exceeds
``-log10(ALPHA)`` (2 for ALPHA 0.01): the chance that a night like the reference alarms is then at
most ALPHA, whatever the tests' dependence. Pure numpy and scipy; screening/ feeds it and writes the result.

What is compared is a ``Profile``: the values of each continuous quantity and the counts of each
category, of one night or of a reference (training's test split; the site's last nights, each
stored as a bounded sample in its summary). Only the quantities both sides have are tested, so
a test split, which has no DICOM headers, is compared on what it has.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

__all__ = ["ALPHA", "CATEGORIES", "DRIFT_REFERENCE_FILE", "VALUES", "DriftResult", "DriftTest", "Profile", "categories_test", "combine",
           "compare", "distribution_test", "image_statistics"]

ALPHA = 0.01  # the most often a night like the reference may alarm
MIN_SAMPLES = 5  # fewer values on a side test nothing (p-value 1)
# The quantities a profile may hold, by the name its test carries.
VALUES = ("probability", "scope score", "image brightness", "image contrast")
CATEGORIES = ("rejected share", "rejection reasons", "DICOM Modality", "DICOM Manufacturer", "DICOM ViewPosition",
              "DICOM PhotometricInterpretation", "DICOM pixel spacing")
DRIFT_REFERENCE_FILE = "drift-reference.json"  # the test split's profile, in the bundle
SAMPLE_VALUES = 500  # values of each quantity a stored profile keeps (a night's summary, the bundle's reference)
MAX_CATEGORY_NAME = 120


@dataclass(frozen=True)
class DriftTest:
    name: str
    statistic: float
    p_value: float
    samples: tuple[int, int]  # tonight's and the reference's
    alarm: bool = False  # set by combine: its adjusted p-value is below ALPHA

    def to_dict(self) -> dict:
        return {"name": self.name, "statistic": round(self.statistic, 6), "p_value": self.p_value,
                "alarm": self.alarm, "samples": list(self.samples)}


@dataclass(frozen=True)
class DriftResult:
    alarm: bool
    score: float
    tests: list[DriftTest] = field(default_factory=list)

    def failing(self) -> list[str]:
        return [test.name for test in self.tests if test.alarm]

    def to_dict(self, reference: object = None) -> dict:
        return {"alarm": self.alarm, "score": round(self.score, 4), "reference": reference,
                "tests": [test.to_dict() for test in self.tests]}


def distribution_test(name: str, tonight: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray
                      ) -> DriftTest:
    """Kolmogorov-Smirnov: the largest gap between the two empirical distributions."""
    tonight, reference = (np.asarray(values, float) for values in (tonight, reference))
    tonight, reference = tonight[np.isfinite(tonight)], reference[np.isfinite(reference)]
    if min(len(tonight), len(reference)) < MIN_SAMPLES:
        return DriftTest(name, 0.0, 1.0, (len(tonight), len(reference)))
    result = ks_2samp(tonight, reference)
    return DriftTest(name, float(result.statistic), float(result.pvalue), (len(tonight), len(reference)))


def categories_test(name: str, tonight: Iterable[str] | Mapping[str, int],
                    reference: Iterable[str] | Mapping[str, int]) -> DriftTest:
    """Chi-squared on the 2 x k table of category counts (a category seen on one side only counts),
    from the categories one by one or their counts. Cramer's V is the statistic, so that nights of
    different sizes compare."""
    tonight, reference = Counter(tonight), Counter(reference)
    sizes = (sum(tonight.values()), sum(reference.values()))
    names = sorted(name for name in set(tonight) | set(reference) if tonight[name] + reference[name] > 0)
    if min(sizes) < MIN_SAMPLES or len(names) < 2:
        return DriftTest(name, 0.0, 1.0, sizes)
    table = np.array([[tonight[category] for category in names], [reference[category] for category in names]])
    chi2, p_value, _, _ = chi2_contingency(table, correction=len(names) == 2)
    cramers_v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    return DriftTest(name, cramers_v, float(p_value), sizes)


def combine(tests: Sequence[DriftTest], alpha: float = ALPHA) -> DriftResult:
    """The drift score and alarm of ``tests`` (Bonferroni: see the module's docstring)."""
    if not tests:
        return DriftResult(False, 0.0, [])
    m = len(tests)
    adjusted = [min(1.0, m * test.p_value) for test in tests]
    marked = [DriftTest(test.name, test.statistic, test.p_value, test.samples, value < alpha)
              for test, value in zip(tests, adjusted)]
    score = max(0.0, -math.log10(max(min(adjusted), 1e-300)))
    return DriftResult(any(test.alarm for test in marked), score, marked)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Brightness and contrast of uint8 RGB images ``(n, h, w, 3)``: the mean grey level and its
    standard deviation, over [0, 1], as ``(n, 2)``."""
    if not len(images):
        return np.zeros((0, 2), np.float32)
    grey = np.asarray(images, np.float32).mean(axis=-1).reshape(len(images), -1) / 255.0
    return np.stack([grey.mean(axis=1), grey.std(axis=1)], axis=1)


@dataclass
class Profile:
    """What a set of images looked like: the values of each quantity of VALUES and the counts of
    each quantity of CATEGORIES, by name (absent: not known for these images)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    categories: dict[str, dict[str, int]] = field(default_factory=dict)

    def sample(self, limit: int = SAMPLE_VALUES, seed: int = 0) -> Profile:
        """At most ``limit`` values of each quantity, drawn without replacement, rounded to 4 places:
        what a summary or bundle keeps. Counts are kept whole."""
        rng = np.random.default_rng(seed)
        values = {}
        for name, found in self.values.items():
            found = np.asarray(found, float)
            found = found[np.isfinite(found)]
            if len(found) > limit:
                found = np.sort(rng.choice(found, limit, replace=False))
            values[name] = [round(float(value), 4) for value in found]
        return Profile(values, {name: dict(counts) for name, counts in self.categories.items()})

    @classmethod
    def merged(cls, profiles: Iterable[Profile]) -> Profile:
        """Several nights as one reference."""
        values: dict[str, list[float]] = {}
        categories: dict[str, Counter] = {}
        for profile in profiles:
            for name, found in profile.values.items():
                values.setdefault(name, []).extend(found)
            for name, counts in profile.categories.items():
                categories.setdefault(name, Counter()).update(counts)
        return cls(values, {name: dict(counts) for name, counts in categories.items()})

    def to_dict(self) -> dict:
        return {"values": self.values, "categories": self.categories}

    @classmethod
    def from_dict(cls, data: object) -> Profile:
        """ValueError names the first part that is not what this code writes."""
        if not isinstance(data, dict) or set(data) != {"values", "categories"}:
            raise ValueError("a drift profile holds exactly 'values' and 'categories'")
        values, categories = data["values"], data["categories"]
        if not isinstance(values, dict) or not isinstance(categories, dict):
            raise ValueError("drift profile values and categories are objects")
        # Quantities this code does not test (written by a later version) are left out, not refused.
        values = {name: found for name, found in values.items() if name in VALUES}
        categories = {name: counts for name, counts in categories.items() if name in CATEGORIES}
        for name, found in values.items():
            if not isinstance(found, list) or not all(_finite(value) for value in found):
                raise ValueError(f"drift profile values {name!r} are not a list of numbers")
        for name, counts in categories.items():
            if not isinstance(counts, dict) or not all(
                    isinstance(key, str) and len(key) <= MAX_CATEGORY_NAME and isinstance(count, int)
                    and not isinstance(count, bool) and count >= 0 for key, count in counts.items()):
                raise ValueError(f"drift profile categories {name!r} are not counts by name")
        return cls({name: [float(value) for value in found] for name, found in values.items()},
                   {name: dict(counts) for name, counts in categories.items()})


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(tonight: Profile, reference: Profile, alpha: float = ALPHA) -> DriftResult:
    """Every quantity both profiles hold, tested and combined (``combine``). A category quantity
    counts only where tonight has any of it: a night of JPEGs says nothing about DICOM headers."""
    tests = [distribution_test(name, tonight.values[name], reference.values[name])
             for name in VALUES if tonight.values.get(name) and reference.values.get(name)]
    tests += [categories_test(name, tonight.categories[name], reference.categories[name])
              for name in CATEGORIES
              if sum(tonight.categories.get(name, {}).values()) and sum(reference.categories.get(name, {}).values())]
    return combine(tests, alpha)
