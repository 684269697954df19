"""On-demand retraining: VGG16 transfer learning, evaluation on a patient-held-out split, registry.

Reads top to bottom as the steps: find the data, load it, split it, fit, calibrate, choose the
threshold and score on test, check the fast engines, fit the scope gate (and keep what the test
split looked like, screening's drift reference), audit what the model learned (metadata
strata, masked lungs, Grad-CAM) and judge it against its plain baseline and the site's criteria,
decide promotion against production on the same split, write the bundle, promote if decided
(unless production changed meanwhile). Each step returns one record (tasks/).

A model store used without a signing key is said to be unsigned first and last: in the log, on
the returned record (the command line prints it) and on the training artifacts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.parameters import TrainParameters
from model.acceptance import Acceptance
from model.augmentation import Augmentation
from model.preprocessing import Preprocessing
from model.training import TrainingConfig
from store.datasets import require_allowed
from store.registry import unsigned_warning
from tasks.bundling import (
    TrainedModel,
    TrainingRun,
    make_bundle,
    publish_bundle,
    report_training,
)
from tasks.clinical import Calibration, audit_model, calibrate_model, judge_fitness
from tasks.promotion import decide_promotion, promote
from tasks.scope_fitting import fit_scope_model, test_split_profile
from tasks.synthetic_training import add_synthetic
from tasks.train_data import (
    discover,
    imagenet_record,
    load_labelled,
    resolve_weights,
    split_for_training,
)
from tasks.train_fit import fit_model
from tasks.train_scoring import check_engines, evaluate_model


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
    require_allowed(params.dataset_uri, params.dataset_prefixes)  # an event may name the dataset: not any
    unsigned = unsigned_warning(params.model_store_uri)
    if unsigned:
        get_run_logger().warning("%s", unsigned)
    spec, config = preprocessing_and_config(params)
    weights, weights_info = resolve_weights(params.weights)  # fail fast on a missing weights file

    dataset = discover(params.dataset_uri)
    loaded = load_labelled(dataset.items, spec)
    split = split_for_training(loaded, params.positive.strip().lower(), params.multiclass, params.test_fraction,
                               params.seed, params.strata, params.balance_strata, params.mixed_strata_only,
                               params.leave_out, params.max_strata)

    training, synthetic = split.training_data(loaded.images), None
    if params.synthetic_uri:  # the training part only: validation and test stay real
        training, synthetic = add_synthetic(training, loaded, split, params.synthetic_uri, params.synthetic_share, spec)
    # The linear head is chosen by cross-validation on the training images (with validation's, when
    # no stage 2 needs validation), and the plain baseline beside it (model/linear_head.py).
    cross_validated = params.head == "linear" and synthetic is None
    cv = split.cross_validation(loaded.images, pooled=cross_validated and not params.fine_tune_epochs,
                                class_weights=params.class_weights)
    fitted = fit_model(training, spec, config, weights, cv, loaded.images[split.test], cross_validated)
    split = split.balanced_by(fitted.balance) if fitted.balance in split.balance_candidates else split
    if weights_info["origin"] == "imagenet" and weights_info["sha256"] is None:
        weights_info = imagenet_record()  # the download has happened by now

    calibration = (calibrate_model(fitted.model, loaded, split, spec, fitted.oof_pairs) if params.calibrate
                   else Calibration())
    oof = fitted.oof_pairs if calibration.oof is None else (fitted.oof_rows, calibration.oof)
    evaluation = evaluate_model(fitted.model, loaded, split, spec, params.target_sensitivity, oof)
    engines = check_engines(fitted.model, spec, loaded, split, evaluation.threshold, params.seed, evaluation)
    scope = fit_scope_model(fitted.model, loaded, split, spec, params.scope_pass_rate, params.scope_negatives_uri,
                            params.seed, fitted.pooled, fitted.test_pooled)
    reference = test_split_profile(loaded, split, evaluation.test_probabilities, scope)  # screening's drift reference
    criteria = Acceptance(min_auc=params.min_auc, min_specificity=params.min_specificity,
                          target_sensitivity=params.target_sensitivity, bound=params.acceptance_bound)
    audit = audit_model(fitted.model, loaded, split, spec, evaluation, params.bootstrap, params.seed)
    audit = judge_fitness(audit, split, fitted.baseline, criteria, params.bootstrap, params.seed, params.calibrate)

    promotion = decide_promotion(params.model_store_uri, loaded, split, spec, evaluation, audit,
                                 force=params.force_promote, require_approval=params.require_approval,
                                 leave_out=params.leave_out)
    run = TrainingRun(dataset, loaded, split, spec, config, weights_info, params.test_fraction, criteria, synthetic)
    card, files = make_bundle(run, fitted, evaluation, calibration, audit, promotion, scope, reference)
    bundle_uri = publish_bundle(params.model_store_uri, files, card, engines)
    if promotion.promoted:
        promotion = promote(params.model_store_uri, card.version, promotion, by=f"train flow run {flow_run.name}")
    trained = TrainedModel(card, bundle_uri, promotion.promoted, promotion.reason, unsigned)
    report_training(trained)
    return trained
