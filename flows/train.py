"""On-demand retraining: VGG16 transfer learning, evaluation on a patient-held-out split, registry.

Reads top to bottom as the steps: find the data, load it, split it, fit, calibrate on validation,
choose the threshold on validation and score on test, audit what the model learned (metadata
strata, masked lungs, Grad-CAM), compare with production on the same split, write the bundle,
promote if it is better (unless approval is required, or production changed meanwhile).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.parameters import TrainParameters
from model.acceptance import Acceptance, compare_with_baseline, judge
from model.augmentation import Augmentation
from model.preprocessing import Preprocessing
from model.training import TrainingConfig
from store import registry
from tasks.bundling import TrainedModel, make_bundle, promote, publish_bundle, read_production, report_training
from tasks.clinical import audit_baseline, audit_model, calibrate_model
from tasks.synthetic_training import add_synthetic
from tasks.train_steps import (
    calibration_sample,
    check_engines,
    discover,
    evaluate_model,
    fit_model,
    load_labelled,
    resolve_weights,
    score_production,
    split_for_training,
)


def preprocessing_and_config(params: TrainParameters) -> tuple[Preprocessing, TrainingConfig]:
    """The model's preprocessing and the training recipe the parameters ask for."""
    return Preprocessing(input_size=params.input_size, scale_mode=params.scale_mode), TrainingConfig(
        epochs=params.epochs, fine_tune_epochs=params.fine_tune_epochs, batch_size=params.batch_size,
        seed=params.seed, augment_draws=params.augment_draws, class_weights=params.class_weights, head=params.head,
        augment_head=params.augment_head,
        augmentation=Augmentation(horizontal_flip=params.horizontal_flip))


@flow(name="train", description="Train a VGG16 transfer-learning classifier and register it.")
def train(params: TrainParameters) -> TrainedModel:
    """Returns the new version, whether it was promoted and why; its card holds the test metrics."""
    spec, config = preprocessing_and_config(params)
    weights, weights_info = resolve_weights(params.weights)  # fail fast on a missing weights file

    dataset = discover(params.dataset_uri)
    loaded = load_labelled(dataset.items, spec)
    split = split_for_training(loaded, params.positive.strip().lower(), params.multiclass, params.test_fraction,
                               params.seed, params.strata, params.balance_strata, params.mixed_strata_only,
                               params.leave_out)

    training, synthetic = split.training_data(loaded.images), None
    if params.synthetic_uri:  # the training part only: validation and test stay real
        training, synthetic = add_synthetic(training, loaded, split, params.synthetic_uri, params.synthetic_share, spec)
    # The linear head is chosen by cross-validation on the training images (with validation's, when
    # no stage 2 needs validation), and the plain baseline beside it (model/linear_head.py).
    cross_validated = params.head == "linear" and synthetic is None
    cv = split.cross_validation(loaded.images, pooled=cross_validated and not params.fine_tune_epochs,
                                class_weights=params.class_weights)
    fitted = fit_model(training, spec, config, weights, cv, loaded.images[split.test], cross_validated)
    model = fitted.model
    split = split.balanced_by(fitted.balance) if fitted.balance in split.balance_candidates else split
    if weights_info["origin"] == "imagenet" and weights_info["sha256"] is None:
        weights_info = resolve_weights.fn("imagenet")[1]  # the download has happened by now
    oof = None if fitted.oof is None else (fitted.oof_rows, fitted.oof)
    calibration, reliability, calibrated_oof = (calibrate_model(model, loaded, split, spec, oof) if params.calibrate
                                                else ({}, None, None))
    if oof is not None and calibrated_oof is not None:
        oof = (oof[0], calibrated_oof)
    threshold, metrics, test_probabilities = evaluate_model(model, loaded, split, spec, params.target_sensitivity, oof)
    engine_checks, engine_files = check_engines(
        model, spec, threshold, split.classes.index(split.positive), loaded.images[split.test], split.labels[split.test],
        test_probabilities, loaded.images[calibration_sample(split.train, params.seed)],
        [loaded.items[index].uri for index in split.test])
    validity, mean_cam = audit_model(model, loaded, split, spec, threshold, test_probabilities, params.bootstrap,
                                     params.seed)
    if fitted.baseline is not None:
        baseline = audit_baseline(split, fitted.baseline, params.target_sensitivity, params.bootstrap, params.seed,
                                  calibrate=params.calibrate)
        validity["baseline"] = baseline
        validity["against_baseline"] = compare_with_baseline(
            {"auc": validity["overall"]["auc"], "mean_within_auc": validity["mean_within_auc"]},
            {"auc": baseline["overall"]["auc"], "mean_within_auc": baseline["mean_within_auc"]})
    criteria = Acceptance(min_auc=params.min_auc, min_specificity=params.min_specificity,
                          target_sensitivity=params.target_sensitivity, bound=params.acceptance_bound)
    validity["fitness"] = judge(validity["overall"], criteria).to_dict()

    seen = read_production(params.model_store_uri)  # promotion is written only if this is still production
    production = score_production(params.model_store_uri, loaded, split, spec)
    promoted, reason = registry.promotion_decision(
        {**metrics["positive"], "within_auc": validity["mean_within_auc"], "warnings": validity["model_warnings"]},
        production, params.force_promote, fitness=validity["fitness"],
        against_baseline=validity.get("against_baseline"),
        experiment=f"trained with {params.leave_out} left out" if params.leave_out else None,
        require_approval=params.require_approval)
    card, files = make_bundle(model, fitted.history, threshold, metrics, dataset=dataset, loaded=loaded, split=split,
                              spec=spec, config=config, weights=weights_info, test_fraction=params.test_fraction,
                              validity=validity, calibration=calibration, features_engine=fitted.features_engine,
                              selection=fitted.selection, acceptance=criteria,
                              figures={"calibration.png": reliability, "gradcam.png": mean_cam}, synthetic=synthetic,
                              promotion={"promoted": promoted, "reason": reason,
                                         "compared_with": production and production["version"],
                                         "require_approval": params.require_approval})
    bundle_uri = publish_bundle(params.model_store_uri, files, card, engine_checks, engine_files)
    if promoted:
        promoted, reason = promote(params.model_store_uri, card.version, reason, seen,
                                   by=f"train flow run {flow_run.name}")
    trained = TrainedModel(card, bundle_uri, promoted, reason)
    report_training(trained)
    return trained
