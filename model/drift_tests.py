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
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

__all__ = ["ALPHA", "DriftResult", "DriftTest", "categories_test", "combine", "distribution_test"]

ALPHA = 0.01  # the most often a night like the reference may alarm
MIN_SAMPLES = 5  # fewer values on a side test nothing (p-value 1)


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


def categories_test(name: str, tonight: Iterable[str], reference: Iterable[str]) -> DriftTest:
    """Chi-squared on the 2 x k table of category counts (a category seen on one side only counts).
    Cramer's V is the statistic, so that nights of different sizes compare."""
    tonight, reference = Counter(tonight), Counter(reference)
    sizes = (sum(tonight.values()), sum(reference.values()))
    names = sorted(set(tonight) | set(reference))
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
    score = -math.log10(max(min(adjusted), 1e-300))
    return DriftResult(any(test.alarm for test in marked), score, marked)
