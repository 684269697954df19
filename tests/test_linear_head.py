"""The linear head as a cross-validated logistic regression, its baseline, and the acceptance judge."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from model.acceptance import Acceptance, compare_with_baseline, judge
from model.linear_head import CrossValidation, cross_validated_folds, fit_logistic, fit_selected, select_logistic_head


def _data(n: int = 240, features: int = 24, seed: int = 0):
    """A disease signal in feature 0 for everyone, and a shortcut: adults are mostly positive and
    feature 1 says 'adult'. Children hold negatives only (their own level)."""
    rng = np.random.default_rng(seed)
    adult = np.arange(n) < n // 2
    labels = np.where(adult, rng.random(n) < 0.7, False).astype(int)
    x = rng.normal(size=(n, features))
    x[:, 0] += 1.2 * labels
    x[:, 1] += 3.0 * adult
    groups = np.array([f"p{i // 2}" for i in range(n)])  # two images per patient
    levels = np.where(adult, "adult", "child")
    return x, labels, groups, levels


def test_fit_logistic_is_scikit_learns_regression_on_standardised_features():
    x, labels, _, _ = _data()
    head = fit_logistic(x, labels, None, 0.05, 2)
    reference = LogisticRegression(C=0.05, max_iter=1000, tol=1e-8).fit(StandardScaler().fit_transform(x), labels)
    ours = head.predict(x)[:, 1]
    theirs = reference.predict_proba(StandardScaler().fit_transform(x))[:, 1]
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.allclose(head.predict(x).sum(axis=1), 1.0)


def test_folds_never_split_a_patient_and_keep_both_classes():
    _, labels, groups, _ = _data()
    folds = cross_validated_folds(labels, groups, 5, seed=0)
    assert len(folds) == 5
    for fit_rows, held_rows in folds:
        assert not set(groups[fit_rows]) & set(groups[held_rows])
        assert 0 < labels[held_rows].sum() < len(held_rows)
    assert sorted(np.concatenate([held for _, held in folds]).tolist()) == list(range(len(labels)))


def test_selection_scores_out_of_fold_and_the_baseline_is_the_best_plain_candidate():
    x, labels, groups, levels = _data()
    data = CrossValidation(np.zeros((len(labels), 1)), labels, groups, {"age_group": levels},
                           {"age_group": levels, "none": None})
    # An "augmented" draw that is pure noise: cross-validation must not prefer it.
    noise = [np.random.default_rng(1).normal(size=x.shape)]
    selection = select_logistic_head(data, x, noise, 2, 1, c_grid=(1e-3, 1e-1), folds=4)
    assert len(selection.candidates) == 2 * 2 * 2  # weightings x features x C
    assert selection.head.features == "plain"
    assert selection.baseline.features == "plain"
    best = max(row["cv_score"] for row in selection.candidates)
    assert selection.head.score == pytest.approx(best)
    # The score is the mean of the out-of-fold AUC and within-stratum AUC (only adults mix classes).
    assert selection.head.score == pytest.approx((selection.head.auc + selection.head.within_auc) / 2)
    # Out-of-fold: every image predicted once, by a model that did not see its patient.
    assert selection.head.oof.shape == (len(labels), 2)
    assert np.allclose(selection.head.oof.sum(axis=1), 1.0)
    record = selection.record()
    assert record["chosen"]["weighting"] in ("age_group", "none") and "rule" in record


def test_a_tie_goes_to_the_lower_cross_entropy_not_the_flattest_model():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 40)
    x = rng.normal(size=(80, 5))
    x[:, 0] += 6.0 * labels  # perfectly separable: every C gives AUC 1
    data = CrossValidation(np.zeros((80, 1)), labels, np.array([f"p{i}" for i in range(80)]), {}, {"none": None})
    selection = select_logistic_head(data, x, [], 2, 1, c_grid=(1e-4, 1.0), folds=4)
    assert selection.head.auc == 1.0
    assert selection.head.c == 1.0  # C=1e-4 ties on AUC but squashes every probability towards 0.5


def test_one_class_levels_keep_their_weight_so_children_stay_negative():
    x, labels, groups, levels = _data(seed=3)
    data = CrossValidation(np.zeros((len(labels), 1)), labels, groups, {}, {"age_group": levels})
    weights = data.weights("age_group", np.arange(len(labels)), 2)
    child = levels == "child"
    assert weights[child].mean() > 0.5  # not a tenth of a share
    chosen = select_logistic_head(data, x, [], 2, 1, c_grid=(0.1,), folds=4).head
    head = fit_selected(data, x, [], chosen, 2)
    flagged_children = (head.predict(x[child])[:, 1] >= 0.5).mean()
    assert flagged_children < 0.2


def _overall(auc, auc_low, spec, spec_low, sens):
    return {"auc": auc, "auc_ci": [auc_low, 1.0], "specificity": spec, "specificity_ci": [spec_low, 1.0],
            "sensitivity": sens}


def test_acceptance_fails_the_model_that_flags_almost_everyone():
    # The default model the issue measured: AUC 0.65 [0.54, 0.77], specificity 0.07 at sensitivity 0.92.
    verdict = judge(_overall(0.65, 0.54, 0.07, 0.02, 0.92))
    assert not verdict.fit
    assert verdict.line.startswith("NOT FIT FOR SCREENING")
    assert len(verdict.reasons) == 2 and "AUC" in verdict.reasons[0] and "specificity" in verdict.reasons[1]
    assert judge(_overall(0.95, 0.90, 0.70, 0.55, 0.95)).fit


def test_acceptance_bound_and_unmeasurable_figures():
    figures = _overall(0.85, 0.70, 0.60, 0.40, 0.95)
    assert not judge(figures, Acceptance(min_auc=0.75)).fit  # lower bound 0.70
    assert judge(figures, Acceptance(min_auc=0.75, bound="point")).fit  # estimate 0.85
    assert not judge({**figures, "auc": None, "auc_ci": [None, None]}, Acceptance(bound="point")).fit
    assert not judge({**figures, "sensitivity": 0.80}).fit  # the threshold broke its promise (0.95 - 0.10)
    with pytest.raises(ValueError, match="min_auc"):
        Acceptance(min_auc=1.5)
    assert Acceptance.from_dict(Acceptance(min_auc=0.6).to_dict()) == Acceptance(min_auc=0.6)
    assert not judge({"auc": 10**400, "auc_ci": [float("nan"), 1]}).fit  # hostile figures are not numbers


def test_compare_with_baseline_holds_back_a_clear_shortfall_only():
    baseline = {"auc": 0.90, "mean_within_auc": 0.75}
    assert not compare_with_baseline({"auc": 0.89, "mean_within_auc": 0.76}, baseline)["worse"]
    found = compare_with_baseline({"auc": 0.80, "mean_within_auc": 0.76}, baseline)
    assert found["worse"] and "AUC 0.800 is 0.100 below" in found["reasons"][0]
    assert compare_with_baseline({"auc": 0.90, "mean_within_auc": 0.70}, baseline)["worse"]
    assert not compare_with_baseline({"auc": 0.90, "mean_within_auc": None}, baseline)["worse"]


@pytest.mark.parametrize("classes, present", [(2, (0, 1)), (4, (0, 1, 2, 3)), (3, (0, 2))])
def test_the_keras_head_is_the_fitted_regression_after_a_save_and_load(tmp_path, classes, present):
    import keras

    from model.bundle import model_to_bytes
    from model.network import build_classifier, set_linear_head

    rng = np.random.default_rng(classes)
    labels = rng.choice(present, 90)
    pooled = rng.normal(size=(90, 512)) * rng.uniform(0.1, 30, 512)
    pooled[:, 0] += 3 * labels
    head = fit_logistic(pooled, labels, None, 0.1, classes)
    keras.utils.set_random_seed(0)
    model = build_classifier(classes, 32, None, head="linear")
    set_linear_head(model, head.mean, head.variance, head.kernel, head.bias)
    maps = np.repeat(np.repeat(pooled[:, None, None, :], 1, 1), 1, 2).astype("float32")  # the 1x1 map of 32 px
    (tmp_path / "model.keras").write_bytes(model_to_bytes(model))
    again = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True).get_layer("head")
    for keras_head in (model.get_layer("head"), again):
        ours = keras.ops.convert_to_numpy(keras_head(maps, training=False))
        assert np.abs(ours - head.predict(pooled)).max() < 1e-4
    absent = [k for k in range(classes) if k not in present]
    assert not absent or head.predict(pooled)[:, absent].max() < 1e-6  # a class never seen is never predicted


def test_no_cross_validation_without_two_patients_of_every_class_and_skipped_weightings():
    labels = np.array([1, 1, 1] + [0] * 10)
    groups = np.array(["one-patient"] * 3 + [f"n{i}" for i in range(10)])
    data = CrossValidation(np.zeros((13, 1)), labels, groups, {}, {"none": None})
    assert data.folds_possible() == 1
    with pytest.raises(ValueError, match="two patients of every class"):
        cross_validated_folds(labels, groups, 5, 0)

    # --mixed-strata-only where a fold may hold no level with both classes: that candidate is skipped
    # and said so; the others still run.
    x, labels, groups, levels = _data()
    levels = np.where(np.arange(len(labels)) < 12, "small-mixed", levels)
    data = CrossValidation(np.zeros((len(labels), 1)), labels, groups, {}, {"site": np.where(labels == 1, "pos", "neg"),
                                                                          "none": None}, mixed_only=True)
    selection = select_logistic_head(data, x, [], 2, 1, c_grid=(0.1,), folds=4)
    skipped = [row for row in selection.candidates if "skipped" in row]
    assert skipped and skipped[0]["weighting"] == "site" and selection.head.weighting == "none"
