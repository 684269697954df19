"""Choosing what to balance, and a threshold under weights: small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluation import choose_threshold, predict_classes
from model.strata import confounders, joint_levels

# Ten images: age predicts the label almost perfectly, site not at all, view is constant.
POSITIVE = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
STRATA = {
    "age": ["adult"] * 5 + ["child"] * 5,
    "site": ["a", "a", "b", "b", "a", "b", "a", "b", "b", "b"],  # half positive in each site
    "view": ["PA"] * 10,
}


def test_auto_balances_the_strata_that_predict_the_label_and_only_those():
    assert confounders(POSITIVE, STRATA) == "age"
    both = {**STRATA, "ward": ["icu"] * 4 + ["er", "er", "icu"] + ["er"] * 3}  # also predictive, also mixed
    assert confounders(POSITIVE, both) in ("age+ward", "ward+age")
    assert confounders(POSITIVE, {"site": STRATA["site"]}) is None  # says nothing of the label
    # A level per class: predictive, but nothing to balance within any level.
    assert confounders(POSITIVE, {"source": ["x" if p else "y" for p in POSITIVE]}) is None


def test_joint_levels_and_unknown_columns():
    assert joint_levels(STRATA, "age+site")[1:3] == ["adult | a", "adult | b"]
    assert joint_levels(STRATA, "view") == ["PA"] * 10
    with pytest.raises(ValueError, match="no manifest column 'hospital'"):
        joint_levels(STRATA, "age+hospital")


def test_a_weighted_threshold_counts_each_positive_by_its_weight():
    truth = np.array([1, 1, 1, 1, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.5, 0.1])
    # Unweighted, 75 % sensitivity needs the top three positives: the threshold sits below 0.7.
    assert 0.5 < choose_threshold(truth, scores, 0.75) <= 0.7
    # When the lowest-scored positive carries most of the weight, it must be flagged.
    assert choose_threshold(truth, scores, 0.75, weights=np.array([1, 1, 1, 5, 1, 1])) <= 0.2


def test_in_binary_mode_the_threshold_decides_the_predicted_class():
    probabilities = np.array([[0.7, 0.3], [0.45, 0.55], [0.2, 0.8]])
    assert predict_classes(probabilities, ["non-covid", "covid"], "covid", 0.25).tolist() == [1, 1, 1]
    assert predict_classes(probabilities, ["non-covid", "covid"], "covid", 0.6).tolist() == [0, 0, 1]
    three = np.array([[0.5, 0.3, 0.2]])
    assert predict_classes(three, ["a", "covid", "c"], "covid", 0.1).tolist() == [0]  # argmax with more classes


def test_one_split_rule_for_training_and_for_rebuilding_a_versions_split():
    from store.datasets import LabelledImage, training_parts
    from tasks.train_data import LabelledArrays, build_split

    items = tuple(LabelledImage(f"/d/{label}/{n}.png", label, patient_id=f"{label}-{n // 2}",
                                metadata={"site": "b" if n % 5 == 0 else "a"})
                  for label in ("covid", "normal") for n in range(40))
    parts = training_parts(items, 0.2, seed=3, leave_out="site=b")
    every = [*parts.train, *parts.validation, *parts.test, *parts.left_out]
    assert sorted(item.uri for item in every) == sorted(item.uri for item in items)  # each image once
    assert {item.metadata["site"] for item in parts.left_out} == {"b"}
    assert "b" not in {item.metadata["site"] for item in (*parts.train, *parts.validation, *parts.test)}
    sides = [{item.patient_id for item in part} for part in (parts.train, parts.validation, parts.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])  # no patient on two sides

    # Training's split is exactly this rule: validate-engines and site evaluation rebuild the same test images.
    split = build_split(LabelledArrays(items, np.zeros((len(items), 1, 1, 3), np.uint8), ()), "covid", False, 0.2, 3,
                        leave_out="site=b")
    for rows, part in ((split.train, parts.train), (split.validation, parts.validation), (split.test, parts.test),
                       (split.held_out, parts.left_out)):
        assert sorted(items[row].uri for row in rows) == sorted(item.uri for item in part)
