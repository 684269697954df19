"""model/validity.py on hand-computed cases, and the phantom data sets with and without a shortcut."""

from __future__ import annotations

import csv
import json
import time

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model.validity import (
    audit,
    bootstrap_interval,
    default_strata,
    metadata_baseline_auc,
    shortcut_warnings,
    stratum_sample_weights,
    stratum_table,
    within_stratum_auc,
)
from store.phantoms import MARKER_BOX, write_phantom_dataset


def _pairwise_within_auc(is_positive, scores, levels) -> float:
    """The definition, O(n^2): same-level positive-negative pairs, ties count 1/2."""
    wins = pairs = 0.0
    for i in np.flatnonzero(is_positive):
        for j in np.flatnonzero(~is_positive):
            if levels[i] == levels[j]:
                pairs += 1
                wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return wins / pairs


# --- within-stratum AUC -------------------------------------------------------------------------


def test_scores_that_only_track_the_level_score_half_within_levels():
    # Adults mostly positive, children mostly negative; the score is the level and nothing else.
    levels = ["adult"] * 4 + ["child"] * 4
    is_positive = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    scores = np.array([0.9] * 4 + [0.1] * 4)
    # Overall: of 16 pairs, 3 adult positives beat 3 child negatives (9) and tie the adult
    # negative (1.5); the child positive ties the 3 child negatives (1.5): 12/16.
    assert roc_auc_score(is_positive, scores) == pytest.approx(0.75)
    assert within_stratum_auc(is_positive, scores, levels) == pytest.approx(0.5)


def test_a_high_overall_auc_can_be_worse_than_chance_within_levels():
    # 9 positives and 1 negative among adults, the reverse among children; scores rank by level,
    # and within each level the one minority image outranks the majority.
    levels = ["adult"] * 10 + ["child"] * 10
    is_positive = np.array([1] * 9 + [0] + [1] + [0] * 9, bool)
    scores = np.array([0.80 + 0.01 * i for i in range(9)] + [0.95] + [0.05] + [0.10 + 0.01 * i for i in range(9)])
    assert roc_auc_score(is_positive, scores) == pytest.approx(81 / 100)  # adult positives beat child negatives
    assert within_stratum_auc(is_positive, scores, levels) == pytest.approx(0.0)


def test_within_auc_weights_levels_by_their_pairs():
    levels = ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    is_positive = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    scores = np.array([0.9, 0.8, 0.1, 0.5, 0.4, 0.6, 0.2, 0.3])
    # a: AUC 1 over 2 pairs; b: AUC 0.5 over 2 pairs; c: AUC 0 over 1 pair -> (2 + 1 + 0) / 5.
    assert within_stratum_auc(is_positive, scores, levels) == pytest.approx(0.6)


def test_within_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    is_positive = rng.random(90) < 0.4
    scores = np.round(rng.random(90) + 0.3 * is_positive, 1)  # rounded: many ties
    levels = rng.choice(["x", "y", "z"], 90)
    assert within_stratum_auc(is_positive, scores, levels) == pytest.approx(
        _pairwise_within_auc(is_positive, scores, levels))


def test_one_level_gives_the_plain_auc():
    rng = np.random.default_rng(1)
    is_positive = rng.random(60) < 0.5
    scores = np.round(rng.random(60) + 0.5 * is_positive, 1)
    assert within_stratum_auc(is_positive, scores, ["all"] * 60) == pytest.approx(roc_auc_score(is_positive, scores))


def test_levels_with_one_class_are_left_out():
    is_positive = np.array([1, 0, 1, 0], bool)
    scores = np.array([0.9, 0.2, 0.3, 0.8])
    levels = ["a", "a", "b", "b"]
    before = within_stratum_auc(is_positive, scores, levels)
    after = within_stratum_auc(np.r_[is_positive, [True, True]], np.r_[scores, [0.0, 0.01]], levels + ["c", "c"])
    assert before == after == pytest.approx(0.5)


def test_no_mixed_level_gives_none():
    assert within_stratum_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], ["a", "a", "b", "b"]) is None


# --- metadata-only baseline ----------------------------------------------------------------------


def test_metadata_baseline_scores_each_level_by_its_training_rate():
    train_levels = ["A"] * 4 + ["B"] * 4
    train_is_positive = [1, 1, 1, 0, 1, 0, 0, 0]  # A: 0.75, B: 0.25, overall 0.5
    test_levels = ["A", "A", "B", "B", "C"]  # C is unseen: it scores the overall 0.5
    test_is_positive = [1, 0, 0, 0, 1]
    # Positives score 0.75 and 0.5, negatives 0.75, 0.25, 0.25: (0.5 + 1 + 1 + 0 + 1 + 1) / 6.
    auc = metadata_baseline_auc(train_levels, train_is_positive, test_levels, test_is_positive)
    assert auc == pytest.approx(0.75)


def test_metadata_baseline_of_a_label_that_is_the_level_is_perfect_and_of_one_class_none():
    assert metadata_baseline_auc(["a", "b"] * 5, [1, 0] * 5, ["b", "a", "a"], [0, 1, 1]) == 1.0
    assert metadata_baseline_auc(["a", "b"] * 5, [1, 0] * 5, ["b", "a"], [1, 1]) is None


# --- patient bootstrap ----------------------------------------------------------------------------


def _scored_images(count: int, seed: int):
    rng = np.random.default_rng(seed)
    is_positive = rng.random(count) < 0.4
    scores = rng.normal(0, 1, count) + 1.2 * is_positive
    levels = rng.choice(["adult", "child"], count)
    patients = [f"p{i // 2}" if i % 5 else None for i in range(count)]  # pairs of images; some without an id
    return is_positive, scores, levels, patients


def test_bootstrap_interval_contains_the_estimate_and_is_fast():
    is_positive, scores, levels, patients = _scored_images(130, 0)
    started = time.perf_counter()
    low, high = bootstrap_interval(within_stratum_auc, is_positive, scores, levels, patients, n_resamples=1000)
    elapsed = time.perf_counter() - started
    assert low < within_stratum_auc(is_positive, scores, levels) < high
    assert elapsed < 5.0, f"1000 resamples of 130 images took {elapsed:.1f} s"


def test_bootstrap_interval_narrows_with_more_patients():
    small = _scored_images(60, 1)
    large = _scored_images(600, 1)
    low_small, high_small = bootstrap_interval(within_stratum_auc, *small, n_resamples=300)
    low_large, high_large = bootstrap_interval(within_stratum_auc, *large, n_resamples=300)
    assert high_large - low_large < 0.6 * (high_small - low_small)


def test_bootstrap_draws_whole_patients():
    # Each patient has three images; scores carry the patient number, levels the image number.
    patients = np.repeat(np.arange(12), 3)
    image_of_patient = np.tile(["first", "second", "third"], 12)
    seen = []

    def copies_per_image(is_positive, scores, levels):
        for patient in np.unique(scores):
            copies = [int(((scores == patient) & (levels == image)).sum()) for image in ("first", "second", "third")]
            seen.append(len(set(copies)) == 1)
        return 0.0

    bootstrap_interval(copies_per_image, np.zeros(36, bool), patients.astype(float), image_of_patient,
                       list(patients), n_resamples=50)
    assert seen and all(seen)


def test_duplicated_images_of_a_patient_widen_the_patient_interval():
    # 24 patients, each imaged 6 times identically. Resampling images would count each patient
    # six times over as independent evidence; resampling patients does not.
    rng = np.random.default_rng(3)
    is_positive = np.repeat(rng.random(24) < 0.5, 6)
    scores = np.repeat(rng.normal(0, 1, 24), 6) + is_positive
    patients = list(np.repeat([f"p{i}" for i in range(24)], 6))
    levels = np.zeros(len(scores))
    by_image = bootstrap_interval(within_stratum_auc, is_positive, scores, levels, None, n_resamples=500)
    by_patient = bootstrap_interval(within_stratum_auc, is_positive, scores, levels, patients, n_resamples=500)
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])


def test_bootstrap_of_an_undefined_statistic_gives_no_interval():
    assert bootstrap_interval(within_stratum_auc, [1, 1], [0.2, 0.3], ["a", "a"], None, n_resamples=20) == (None, None)


# --- tables, audit, warnings ----------------------------------------------------------------------


def test_stratum_table_by_hand():
    rows = stratum_table([1, 0, 1, 1, 0], [0.9, 0.4, 0.6, 0.2, 0.1], 0.5, ["b", "b", "b", "a", "a"])
    assert [row["level"] for row in rows] == ["a", "b"]
    a, b = rows
    assert a == {"level": "a", "images": 2, "positives": 1, "auc": 1.0, "sensitivity": 0.0, "specificity": 1.0,
                 "flagged_share": 0.0, "mean_probability": pytest.approx(0.15)}
    assert b["auc"] == 1.0 and b["sensitivity"] == 1.0 and b["specificity"] == 1.0
    assert b["flagged_share"] == pytest.approx(2 / 3) and b["mean_probability"] == pytest.approx(1.9 / 3)
    only_positives = stratum_table([1, 1], [0.7, 0.3], 0.5, ["x", "x"])[0]
    assert only_positives["auc"] is None and only_positives["specificity"] is None
    assert only_positives["sensitivity"] == 0.5


def _shortcut_split(seed: int, shortcut: bool):
    """With ``shortcut``, adults are mostly positive and the score sees only the age group;
    without, the label is independent of age and the score sees only the label."""
    rng = np.random.default_rng(seed)
    ages = rng.choice(["adult", "paediatric"], 120)
    if shortcut:
        is_positive = np.where(ages == "adult", rng.random(120) < 0.9, rng.random(120) < 0.1)
        scores = np.where(ages == "adult", 0.7, 0.3) + rng.normal(0, 0.05, 120)
    else:
        is_positive = rng.random(120) < 0.5
        scores = 0.35 + 0.3 * is_positive + rng.normal(0, 0.15, 120)
    return is_positive, np.clip(scores, 0, 1), ages


def test_audit_flags_a_shortcut_and_is_json():
    is_positive, scores, ages = _shortcut_split(0, shortcut=True)
    train_is_positive, _, train_ages = _shortcut_split(1, shortcut=True)
    result = audit(is_positive, scores, 0.5, {"age_group": list(ages)}, [f"p{i // 2}" for i in range(120)],
                   {"age_group": list(train_ages)}, train_is_positive, n_resamples=200)
    json.dumps(result)  # plain types only
    age = result["strata"]["age_group"]
    assert result["overall"]["auc"] > 0.8 and age["within_auc"] < 0.65
    assert age["metadata_baseline_auc"] > 0.85
    low, high = result["overall"]["auc_ci"]
    assert low <= result["overall"]["auc"] <= high
    assert [row["level"] for row in age["levels"]] == ["adult", "paediatric"]
    assert len(result["warnings"]) == 2 and all("age_group" in warning for warning in result["warnings"])


def test_audit_is_silent_without_a_shortcut():
    is_positive, scores, ages = _shortcut_split(0, shortcut=False)
    train_is_positive, _, train_ages = _shortcut_split(1, shortcut=False)
    result = audit(is_positive, scores, 0.5, {"age_group": list(ages)}, None, {"age_group": list(train_ages)},
                   train_is_positive, n_resamples=100)
    assert result["warnings"] == []
    assert abs(result["strata"]["age_group"]["within_auc"] - result["overall"]["auc"]) < 0.1


def test_shortcut_warnings_fire_on_each_trigger_alone():
    def found(overall, within, baseline):
        return {"overall": {"auc": overall},
                "strata": {"source_dataset": {"within_auc": within, "metadata_baseline_auc": baseline}}}

    assert shortcut_warnings(found(0.95, 0.90, 0.79)) == []
    assert shortcut_warnings(found(0.95, None, None)) == []
    [baseline] = shortcut_warnings(found(0.95, 0.90, 0.93))
    assert "predictable from source_dataset alone" in baseline and "0.93" in baseline
    [gap] = shortcut_warnings(found(0.95, 0.70, 0.50))
    assert "source_dataset" in gap and "0.70" in gap and "0.95" in gap


# --- choosing strata, reweighting -----------------------------------------------------------------


def test_default_strata_on_the_real_manifest_columns():
    rows = 8
    columns = {
        "file": [f"covid/image-{i}.jpg" for i in range(rows)],
        "class": ["covid", "normal", "viral", "bacterial"] * 2,
        "patient_id": [f"p{i // 2}" for i in range(rows)],
        "source_dataset": ["ieee8023", "Figure1", "Actualmed", "Kermany (paediatric, 1-5 y)"] * 2,
        "source_repo": ["ieee8023/covid-chestxray-dataset", "agchung/Figure1"] * 4,
        "commit": ["584034aa", "14fcb774"] * 4,
        "source_path": [f"images/{i}.jpg" for i in range(rows)],
        "view": ["PA", "AP", "AP Supine", "PA"] * 2,
        "age_group": ["adult", "paediatric", "adult? (age not given)", "adult"] * 2,
        "original_label": ["COVID-19", "Klebsiella", "pneumonia_vir", "normal"] * 2,
        "width": ["826", "785", "1024", "826"] * 2,
        "height": ["768", "768", "1000", "900"] * 2,
        "sha256": [f"{i:064x}" for i in range(rows)],
        "site": ["north", "south"] * 4,
        "scanner": ["x"] * rows,  # one level: nothing to compare
        "note": ["", "", "", "", "", "", "", "seen"],  # empty values are not a level
        "age_years": [str(i) for i in range(25)],  # more than 20 levels: too fine to stratify
    }
    assert default_strata(columns) == ["source_dataset", "view", "age_group", "site"]


def _weighted_positive_rate(weights, labels, inside) -> float:
    return float(weights[inside & (labels == 1)].sum() / weights[inside].sum())


def test_stratum_weights_make_the_label_independent_of_the_level():
    # Adults 80% positive, children 10%, a third site with positives only.
    labels = np.array([1] * 8 + [0] * 2 + [1] * 2 + [0] * 18 + [1] * 5)
    levels = np.array(["adult"] * 10 + ["child"] * 20 + ["site-x"] * 5)
    weights = stratum_sample_weights(labels, levels, num_classes=2)
    assert weights.mean() == pytest.approx(1.0)
    for level in ("adult", "child"):
        assert _weighted_positive_rate(weights, labels, levels == level) == pytest.approx(0.5)
    # Mixed levels keep totals in proportion to their size; the one-class level keeps its images at
    # their class-balanced weight (15 positives of 35: 35 / (2 x 15) each), not a tenth of it: they
    # are patients the model will meet.
    adult, child, single = (weights[levels == level].sum() for level in ("adult", "child", "site-x"))
    assert child / adult == pytest.approx(2.0)
    assert single / adult == pytest.approx(5 * 35 / (2 * 15) / 10)
    mixed_only = stratum_sample_weights(labels, levels, num_classes=2, mixed_only=True)
    assert (mixed_only[levels == "site-x"] == 0).all() and mixed_only.mean() == pytest.approx(1.0)
    unweighted = np.ones(len(labels))
    assert _weighted_positive_rate(unweighted, labels, levels == "adult") == pytest.approx(0.8)  # the check can fail


def test_stratum_weights_balance_every_present_class_and_refuse_nothing_to_balance():
    labels = np.array([0, 1, 2, 2, 2, 2, 0, 0, 1])
    levels = np.array(["a"] * 6 + ["b"] * 3)
    weights = stratum_sample_weights(labels, levels, num_classes=3)
    for level in ("a", "b"):
        inside = levels == level
        totals = [weights[inside & (labels == c)].sum() for c in np.unique(labels[inside])]
        assert np.allclose(totals, totals[0])
    with pytest.raises(ValueError, match="more than one class"):
        stratum_sample_weights(np.array([0, 0, 1]), np.array(["a", "a", "b"]), 2, mixed_only=True)


# --- phantom data sets with and without a shortcut ------------------------------------------------


def _read_manifest(root) -> list[dict]:
    with open(root / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _has_marker(path) -> bool:
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    size = pixels.shape[0]
    top, bottom, left, right = MARKER_BOX
    return bool((pixels[int(size * top):int(size * bottom), int(size * left):int(size * right)] == 255).all())


def test_phantoms_whose_source_is_the_label_carry_a_shortcut(tmp_path):
    write_phantom_dataset(str(tmp_path), per_class=6, size=64, source="label", marker_for="covid")
    rows = _read_manifest(tmp_path)
    assert list(rows[0]) == ["file", "class", "patient_id", "source"] and len(rows) == 12
    assert all(row["source"] == row["class"] for row in rows)
    assert all(_has_marker(tmp_path / row["file"]) == (row["class"] == "covid") for row in rows)
    sources, is_positive = [row["source"] for row in rows], [row["class"] == "covid" for row in rows]
    assert metadata_baseline_auc(sources[::2], is_positive[::2], sources[1::2], is_positive[1::2]) == 1.0


def test_phantoms_with_an_independent_source_carry_none(tmp_path):
    write_phantom_dataset(str(tmp_path), per_class=6, size=64, source="independent", marker_for="site-a")
    rows = _read_manifest(tmp_path)
    assert {row["source"] for row in rows} == {"site-a", "site-b"}
    assert all(_has_marker(tmp_path / row["file"]) == (row["source"] == "site-a") for row in rows)
    sources, is_positive = [row["source"] for row in rows], [row["class"] == "covid" for row in rows]
    assert metadata_baseline_auc(sources, is_positive, sources, is_positive) == 0.5
    plain = tmp_path / "plain"
    write_phantom_dataset(str(plain), per_class=2, size=64)
    assert not (plain / "manifest.csv").exists()
