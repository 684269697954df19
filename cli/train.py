"""``cxr-screen train`` and ``cxr-screen audit``: options from TrainParameters and AuditParameters."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from cli import lifeline
from cli.exits import EXIT_USAGE, clean_errors
from cli.options import OptionSpec, parameters_command
from cli.output import JSON_OPTION, console, json_mode, print_json, shown
from flows.parameters import AuditParameters, TrainParameters

__all__ = ["audit", "train"]

TRAIN_OPTIONS = {
    "model_store_uri": OptionSpec(envvar="CXR_MODEL_STORE"),
    "epochs": OptionSpec(envvar="CXR_TRAIN_EPOCHS"),
    "fine_tune_epochs": OptionSpec(envvar="CXR_TRAIN_FINE_TUNE_EPOCHS"),
    "input_size": OptionSpec(envvar="CXR_TRAIN_INPUT_SIZE"),
    "weights": OptionSpec(envvar="CXR_WEIGHTS"),
    "require_approval": OptionSpec(envvar="CXR_TRAIN_REQUIRE_APPROVAL"),
    "strata": OptionSpec(comma_separated="COL[,COL]"),
    "dataset_prefixes": OptionSpec(comma_separated="URI[,URI]", envvar="CXR_TRAIN_DATASET_PREFIXES"),
    "min_auc": OptionSpec(envvar="CXR_TRAIN_MIN_AUC"),
    "min_specificity": OptionSpec(envvar="CXR_TRAIN_MIN_SPECIFICITY"),
    "acceptance_bound": OptionSpec(envvar="CXR_TRAIN_ACCEPTANCE_BOUND"),
}

# The audit's folds train as 'train' does; of its settings these are options, the rest keep their defaults.
AUDIT_FIELDS = ("dataset_uri", "by", "output_uri", "epochs", "input_size", "weights", "augment_draws", "batch_size",
                "seed", "positive")


@parameters_command(TrainParameters, arguments=["dataset_uri"], specs=TRAIN_OPTIONS)
def train(params: TrainParameters, as_json: bool = JSON_OPTION) -> None:
    """Train a VGG16 transfer-learning classifier, evaluate it and register it in the model store."""
    if params.synthetic_uri is None and "synthetic_share" in params.model_fields_set:
        # Silently training without the synthetic images the user meant to add would be worse than stopping.
        console.print("[red]error:[/red] --synthetic-share: only with --synthetic URI")
        raise typer.Exit(code=EXIT_USAGE)
    json_mode(as_json)
    lifeline.arm()
    from flows.train import train as train_flow
    from store.registry import unsigned_warning

    unsigned = unsigned_warning(params.model_store_uri)
    if unsigned:  # before the minutes of training, and again at the end
        console.print(f"[bold red]warning:[/bold red] {escape(unsigned)}")
    with clean_errors():
        trained = train_flow(params)
    metrics = trained.card.metrics
    scores = metrics["positive"]
    auc = "n/a" if scores["auc"] is None else f"{scores['auc']:.3f}"
    console.print(
        f"Model [bold]{trained.version}[/bold]: test accuracy {metrics['accuracy']:.3f}, {trained.card.positive_class} "
        f"AUC {auc}, sensitivity {scores['sensitivity_at_threshold']:.3f} / specificity "
        f"{scores['specificity_at_threshold']:.3f} at threshold {trained.card.threshold:.3f}"
    )
    for name, found in trained.card.validity.get("strata", {}).items():
        within, interval = found["within_auc"], found["within_auc_ci"]
        within_shown = "n/a" if within is None else f"{within:.3f}" + (
            f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval and interval[0] is not None else "")
        baseline = found["metadata_baseline_auc"]
        console.print(f"  within {escape(name)}: AUC {within_shown}; {escape(name)} alone reaches "
                      f"{'n/a' if baseline is None else f'{baseline:.3f}'}")
    baseline = trained.card.validity.get("baseline")
    if baseline:
        within = baseline.get("mean_within_auc")
        console.print(f"  plain baseline (logistic regression on the same features): AUC "
                      f"{shown(baseline['overall']['auc'])}, mean within-stratum AUC {shown(within)}")
    added = trained.card.dataset.get("synthetic")
    if added:
        console.print(f"  trained with {added['count']} synthetic {escape(added['class'])} image(s) from "
                      f"{escape(added['uri'])} (training part only)")
    console.print(f"{'Promoted to production' if trained.promoted else 'Not promoted'}: {trained.reason}")
    console.print(f"Bundle: {trained.bundle_uri} (model card: card.md)")
    for line in trained.card.shortcut_warnings:
        console.print(f"[bold red]Shortcut warning:[/bold red] {escape(line)}")
    if unsigned:
        console.print(f"[bold red]warning:[/bold red] {escape(unsigned)}")
    fitness = trained.card.validity.get("fitness", {})
    if fitness:  # last, where a reader's eye lands
        colour = "green" if fitness.get("fit") else "bold red"
        console.print(f"[{colour}]{escape(fitness.get('line', ''))}[/{colour}]")
    if as_json:
        print_json({"version": trained.version, "bundle_uri": trained.bundle_uri, "promoted": trained.promoted,
                    "reason": trained.reason, "card": json.loads(trained.card.to_json()), "unsigned_warning": unsigned})


@parameters_command(AuditParameters, arguments=["dataset_uri"], fields=AUDIT_FIELDS)
def audit(params: AuditParameters) -> None:
    """Leave each level of a manifest column out of training in turn; score the level it never saw."""
    lifeline.arm()
    from flows.audit import audit as audit_flow

    with clean_errors():
        result = audit_flow(params)
    table = Table(title=f"Leave one {result.variable} out")
    for column in ("left out", "images", "positives", "AUC there", "flagged there", "test AUC of the rest", "note"):
        table.add_column(column, justify="left" if column in ("left out", "note") else "right")
    for fold in result.folds:
        table.add_row(escape(fold["level"]), str(fold["images"]), str(fold.get("positives") or 0),
                      shown(fold.get("auc")), shown(fold.get("flagged_share")), shown(fold.get("test_auc")),
                      escape(fold.get("note", "")))
    console.print(table)
    console.print(f"Table: {result.outputs['table.csv']}  Plot: {result.outputs['plot.png']}")
