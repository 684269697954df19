"""Drift tests on distributions whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from model.drift_tests import ALPHA, DriftTest, categories_test, combine, distribution_test


def night(rng: np.random.Generator, size: int, shift: float = 0.0, laterals: float = 0.05) -> list[DriftTest]:
    """Tonight against a fixed reference: probabilities, a scope score and view positions."""
    reference = np.random.default_rng(0)
    return [
        distribution_test("probability", rng.beta(2 + shift * 10, 5, size), reference.beta(2, 5, 400)),
        distribution_test("scope score", rng.gamma(4, 5 + shift * 20, size), reference.gamma(4, 5, 400)),
        categories_test("view", rng.choice(["PA", "AP", "LL"], size, p=[0.6 - laterals / 2, 0.4 - laterals / 2,
                                                                         laterals]),
                        reference.choice(["PA", "AP", "LL"], 400, p=[0.575, 0.375, 0.05])),
    ]


def test_ordinary_nights_rarely_alarm():
    """The false-alarm rate over many nights drawn like the reference stays at or below ALPHA."""
    rng = np.random.default_rng(1)
    alarms = sum(combine(night(rng, 250)).alarm for _ in range(300))
    assert alarms / 300 <= ALPHA + 0.015, alarms  # binomial noise of 300 nights at 1 %: sd 0.006


def test_a_changed_night_alarms_and_names_what_changed():
    shifted = combine(night(np.random.default_rng(2), 250, shift=0.5))
    assert shifted.alarm and shifted.score > 2 and {"probability", "scope score"} <= set(shifted.failing())
    laterals = combine(night(np.random.default_rng(3), 250, laterals=0.6))  # a PACS rule sends laterals
    assert laterals.alarm and laterals.failing() == ["view"]


def test_the_correction_counts_the_tests():
    tests = [DriftTest(f"t{index}", 0.1, 0.004, (100, 100)) for index in range(3)]
    assert not combine(tests).alarm  # 3 x 0.004 = 0.012: not below 0.01
    assert combine(tests[:2]).alarm  # 2 x 0.004 = 0.008
    assert combine(tests[:2]).score == pytest.approx(-np.log10(0.008))
    assert combine([]).alarm is False


def test_too_few_values_test_nothing_and_a_new_category_counts():
    assert distribution_test("p", [0.1, 0.2], np.linspace(0, 1, 100)).p_value == 1.0
    assert categories_test("view", ["PA"] * 50, ["PA"] * 50).p_value == 1.0  # one category: nothing to compare
    new = categories_test("modality", ["DX"] * 30 + ["CT"] * 30, ["DX"] * 200)
    assert new.p_value < 1e-6 and 0 < new.statistic <= 1
    result = combine([new]).to_dict(reference="test split")
    assert result["alarm"] and result["reference"] == "test split" and result["tests"][0]["name"] == "modality"
