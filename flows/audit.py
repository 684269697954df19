"""Leave-one-level-out audit: how does the model do on a source, site or age group it never saw?

For each level of a manifest column: train without it (one task per fold), score the level it
never saw and the usual test split of the rest, then write one table and one plot.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from flows.parameters import AuditParameters
from flows.train import preprocessing_and_config
from store.datasets import DatasetError, metadata_columns
from tasks.clinical import audit_fold, write_audit
from tasks.train_data import discover, load_labelled, resolve_weights


@dataclass(frozen=True)
class AuditResult:
    variable: str
    folds: list[dict]
    outputs: dict[str, str]


@flow(name="audit", description="Leave one level of a metadata column out of training, for each level.")
def audit(params: AuditParameters) -> AuditResult:
    logger = get_run_logger()
    spec, config = preprocessing_and_config(params)
    weights, _ = resolve_weights(params.weights)
    dataset = discover(params.dataset_uri)
    columns = metadata_columns(dataset.items)
    if params.by not in columns:
        raise DatasetError(f"{params.dataset_uri}: no manifest column {params.by!r} "
                           f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    loaded = load_labelled(dataset.items, spec)
    levels = sorted(set(metadata_columns(loaded.items)[params.by]))
    logger.info("Leaving out each of %d levels of %s in turn: %s", len(levels), params.by, ", ".join(levels))
    # One after another: each fold already uses every core, and a shared seed must not race.
    folds = [audit_fold(loaded, params.by, level, positive=params.positive.strip().lower(),
                        multiclass=params.multiclass, test_fraction=params.test_fraction, seed=params.seed,
                        spec=spec, config=config, weights=weights, target_sensitivity=params.target_sensitivity,
                        balance_strata=params.balance_strata, mixed_strata_only=params.mixed_strata_only)
             for level in levels]
    return AuditResult(params.by, folds, write_audit(params.output_uri, params.by, folds))
