"""The ``cxr-screen`` command line: one sub-command per job."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from cli import bootstrap

bootstrap()  # before Prefect or TensorFlow is imported anywhere

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

# lifeline.arm() before a flow: Prefect's temporary server must not outlive a killed command.
from cli import lifeline  # noqa: E402
from cli.models import models_app  # noqa: E402
from flows.parameters import AuditParameters, EvaluateParameters, ScreenParameters, SynthesizeParameters, TrainParameters  # noqa: E402

# Exit codes (README, "Commands"): 2 is click's own for usage errors.
EXIT_RUNTIME, EXIT_USAGE, EXIT_INPUT = 1, 2, 3

app = typer.Typer(
    help="Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"cxr-screen {version('cxr-screen')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect."""


@app.command()
def dataset(
    uri: str = typer.Argument(..., help="Labelled dataset: class sub-folders or a manifest.csv (path, file:// or s3://)."),
    test_fraction: float = typer.Option(0.2, help="Share of patients held out for testing."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (the rest "
                                                         "goes to stderr)."),
) -> None:
    """Describe a labelled dataset: classes, patients, the train/test split, fingerprint, duplicates."""
    _json_mode(as_json)
    from store.datasets import DatasetError, discover_dataset, find_duplicates, fingerprint, hash_images, split_dataset
    from store.storage import StorageError

    try:
        found = discover_dataset(uri)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("Hashing images", total=len(found.items))
            items = hash_images(found.items, on_done=lambda: progress.advance(task))
        split = split_dataset(items, test_fraction=test_fraction, seed=seed)
    except (DatasetError, StorageError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_INPUT) from None

    table = Table(title=f"{uri} ({found.source})")
    for column in ("class", "images", "patients", "train", "test"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label in found.classes:
        of_class = [i for i in items if i.label == label]
        patients = {i.patient_id or i.uri for i in of_class}
        table.add_row(
            label,
            str(len(of_class)),
            str(len(patients)),
            str(sum(i.label == label for i in split.train)),
            str(sum(i.label == label for i in split.test)),
        )
    table.add_row("all", str(len(items)), str(len({i.patient_id or i.uri for i in items})),
                  str(len(split.train)), str(len(split.test)), style="bold")
    console.print(table)
    console.print(f"fingerprint: {fingerprint(items)}")
    if found.ignored:
        console.print(f"ignored {len(found.ignored)} file(s) that are not labelled images, e.g. {found.ignored[0]}")
    report = find_duplicates(items, split)
    for line in report.lines():
        console.print(f"[yellow]duplicate:[/yellow] {line}")
    if not report:
        console.print("no exact duplicates under two labels or across the split")
    if as_json:
        counts = {label: {"images": sum(i.label == label for i in items),
                          "train": sum(i.label == label for i in split.train),
                          "test": sum(i.label == label for i in split.test)} for label in found.classes}
        _print_json({"uri": uri, "source": found.source, "classes": counts, "images": len(items),
                     "patients": len({i.patient_id or i.uri for i in items}), "fingerprint": fingerprint(items),
                     "ignored": len(found.ignored), "duplicates": report.lines()})


def _option(parameters, name: str, *declarations: str, **extra):
    """A command-line option whose default and help come from the flow's parameters model."""
    return typer.Option(parameters.default(name), *declarations, help=parameters.describe(name), **extra)


def _validated(parameters, **values):
    """The flow's parameters, checked before Prefect starts: a bad value ends with one line, exit 2."""
    from pydantic import ValidationError

    try:
        return parameters(**values)
    except ValidationError as error:
        for problem in error.errors():
            if problem["loc"]:
                option = "--" + str(problem["loc"][0]).replace("_", "-")
                console.print(f"[red]error:[/red] {option}: {problem['msg']} (got {problem.get('input')!r})")
            else:  # a rule across options
                console.print(f"[red]error:[/red] {problem['msg'].removeprefix('Value error, ')}")
        raise typer.Exit(code=EXIT_USAGE) from None


@app.command()
def train(
    dataset_uri: str = typer.Argument(..., help=TrainParameters.describe("dataset_uri")),
    model_store: str = _option(TrainParameters, "model_store_uri", "--model-store", envvar="CXR_MODEL_STORE"),
    positive: str = _option(TrainParameters, "positive"),
    multiclass: bool = _option(TrainParameters, "multiclass", "--multiclass"),
    epochs: int = _option(TrainParameters, "epochs", envvar="CXR_TRAIN_EPOCHS"),
    fine_tune_epochs: int = _option(TrainParameters, "fine_tune_epochs", envvar="CXR_TRAIN_FINE_TUNE_EPOCHS"),
    batch_size: int = _option(TrainParameters, "batch_size"),
    input_size: int = _option(TrainParameters, "input_size", envvar="CXR_TRAIN_INPUT_SIZE"),
    weights: str = _option(TrainParameters, "weights", envvar="CXR_WEIGHTS"),
    seed: int = _option(TrainParameters, "seed"),
    test_fraction: float = _option(TrainParameters, "test_fraction"),
    target_sensitivity: float = _option(TrainParameters, "target_sensitivity"),
    augment_draws: int = _option(TrainParameters, "augment_draws"),
    augment_head: bool = _option(TrainParameters, "augment_head", "--augment-head"),
    horizontal_flip: bool = _option(TrainParameters, "horizontal_flip", "--horizontal-flip"),
    class_weights: bool = _option(TrainParameters, "class_weights", "--class-weights/--no-class-weights"),
    scale_mode: str = _option(TrainParameters, "scale_mode"),
    force_promote: bool = _option(TrainParameters, "force_promote", "--force-promote"),
    require_approval: bool = _option(TrainParameters, "require_approval", "--require-approval",
                                     envvar="CXR_TRAIN_REQUIRE_APPROVAL"),
    strata: str | None = typer.Option(None, help="COL[,COL]: " + TrainParameters.describe("strata")),
    balance_strata: str | None = _option(TrainParameters, "balance_strata"),
    mixed_strata_only: bool = _option(TrainParameters, "mixed_strata_only", "--mixed-strata-only"),
    leave_out: str | None = _option(TrainParameters, "leave_out"),
    calibrate: bool = _option(TrainParameters, "calibrate", "--calibrate/--no-calibrate"),
    head: str = _option(TrainParameters, "head"),
    bootstrap: int = _option(TrainParameters, "bootstrap"),
    min_auc: float = _option(TrainParameters, "min_auc", envvar="CXR_TRAIN_MIN_AUC"),
    min_specificity: float = _option(TrainParameters, "min_specificity", envvar="CXR_TRAIN_MIN_SPECIFICITY"),
    acceptance_bound: str = _option(TrainParameters, "acceptance_bound", envvar="CXR_TRAIN_ACCEPTANCE_BOUND"),
    synthetic: str | None = _option(TrainParameters, "synthetic_uri", "--synthetic"),
    # No default here, so that one given without --synthetic can be told apart (and refused).
    synthetic_share: float | None = typer.Option(None, help=TrainParameters.describe("synthetic_share") +
                                                 f" [default: {TrainParameters.default('synthetic_share')}]"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (the rest "
                                                         "goes to stderr)."),
) -> None:
    """Train a VGG16 transfer-learning classifier, evaluate it and register it in the model store."""
    if synthetic is None and synthetic_share is not None:
        # Silently training without the synthetic images the user meant to add would be worse than stopping.
        console.print("[red]error:[/red] --synthetic-share: only with --synthetic URI")
        raise typer.Exit(code=EXIT_USAGE)
    params = _validated(TrainParameters, dataset_uri=dataset_uri, model_store_uri=model_store, positive=positive,
                        multiclass=multiclass, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                        batch_size=batch_size, input_size=input_size, weights=weights, seed=seed,
                        test_fraction=test_fraction, target_sensitivity=target_sensitivity,
                        augment_draws=augment_draws, augment_head=augment_head, horizontal_flip=horizontal_flip, class_weights=class_weights,
                        scale_mode=scale_mode, force_promote=force_promote, require_approval=require_approval,
                        strata=None if strata is None else [name.strip() for name in strata.split(",") if name.strip()],
                        balance_strata=balance_strata, mixed_strata_only=mixed_strata_only, leave_out=leave_out,
                        calibrate=calibrate, head=head, bootstrap=bootstrap, synthetic_uri=synthetic,
                        min_auc=min_auc, min_specificity=min_specificity, acceptance_bound=acceptance_bound,
                        synthetic_share=TrainParameters.default("synthetic_share") if synthetic_share is None
                        else synthetic_share)
    _json_mode(as_json)
    lifeline.arm()
    from flows.train import train as train_flow

    with _clean_errors():
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
        shown = "n/a" if within is None else f"{within:.3f}" + (
            f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval and interval[0] is not None else "")
        baseline = found["metadata_baseline_auc"]
        console.print(f"  within {escape(name)}: AUC {shown}; {escape(name)} alone reaches "
                      f"{'n/a' if baseline is None else f'{baseline:.3f}'}")
    baseline = trained.card.validity.get("baseline")
    if baseline:
        within = baseline.get("mean_within_auc")
        console.print(f"  plain baseline (logistic regression on the same features): AUC "
                      f"{_shown(baseline['overall']['auc'])}, mean within-stratum AUC {_shown(within)}")
    added = trained.card.dataset.get("synthetic")
    if added:
        console.print(f"  trained with {added['count']} synthetic {escape(added['class'])} image(s) from "
                      f"{escape(added['uri'])} (training part only)")
    console.print(f"{'Promoted to production' if trained.promoted else 'Not promoted'}: {trained.reason}")
    console.print(f"Bundle: {trained.bundle_uri} (model card: card.md)")
    for line in trained.card.shortcut_warnings:
        console.print(f"[bold red]Shortcut warning:[/bold red] {escape(line)}")
    fitness = trained.card.validity.get("fitness", {})
    if fitness:  # last, where a reader's eye lands
        colour = "green" if fitness.get("fit") else "bold red"
        console.print(f"[{colour}]{escape(fitness.get('line', ''))}[/{colour}]")
    if as_json:
        _print_json({"version": trained.version, "bundle_uri": trained.bundle_uri, "promoted": trained.promoted,
                     "reason": trained.reason, "card": json.loads(trained.card.to_json())})


@app.command()
def synthesize(
    dataset_uri: str = typer.Argument(..., help=SynthesizeParameters.describe("dataset_uri")),
    synthetic_class: str = _option(SynthesizeParameters, "synthetic_class", "--class"),
    count: int = _option(SynthesizeParameters, "count"),
    out: str = typer.Option(..., "--out", help=SynthesizeParameters.describe("out_uri")),
    generator_store: str = _option(SynthesizeParameters, "generator_store_uri", "--generator-store",
                                   envvar="CXR_GENERATOR_STORE"),
    seed: int = _option(SynthesizeParameters, "seed"),
    test_fraction: float = _option(SynthesizeParameters, "test_fraction"),
    image_size: int = _option(SynthesizeParameters, "image_size"),
    epochs: int = _option(SynthesizeParameters, "epochs"),
    width: int = _option(SynthesizeParameters, "width"),
    batch_size: int = _option(SynthesizeParameters, "batch_size"),
    weights: str = _option(SynthesizeParameters, "weights", envvar="CXR_WEIGHTS"),
    input_size: int = _option(SynthesizeParameters, "input_size", envvar="CXR_TRAIN_INPUT_SIZE"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (the rest "
                                                         "goes to stderr)."),
) -> None:
    """Train a GAN on a dataset's training split; publish synthetic images of one class, unless they copy patients."""
    params = _validated(SynthesizeParameters, dataset_uri=dataset_uri, out_uri=out, synthetic_class=synthetic_class,
                        count=count, generator_store_uri=generator_store, seed=seed, test_fraction=test_fraction,
                        image_size=image_size, epochs=epochs, width=width, batch_size=batch_size, weights=weights,
                        input_size=input_size)
    _json_mode(as_json)
    lifeline.arm()
    from flows.synthesize import synthesize as synthesize_flow

    with _clean_errors(), console.status(f"Synthesising {count} {escape(synthetic_class)} image(s) "
                                         f"(GAN: {epochs} epochs at {image_size} px)"):
        result = synthesize_flow(params)
    for name, found in result.quality.classes.items():
        ratio = "n/a" if found["ratio"] is None else f"{found['ratio']:.2f}"
        memorisation = found["memorisation"]["spaces"]
        console.print(f"  {escape(name)}: Fréchet distance {found['fd']:.4g} vs floor {found['floor']:.4g} "
                      f"(x{ratio}); nearest real image, 5% quantile: " + ", ".join(
                          f"{space} {values['synthetic_to_real']['q05']:.3g} (real-to-real "
                          f"{values['real_to_real']['q05']:.3g})" for space, values in memorisation.items()))
    console.print(f"Generator [bold]{result.version}[/bold]: {result.bundle_uri} (card.md, samples.png)")
    console.print(f"Synthetic dataset: {result.count} {escape(result.synthetic_class)} image(s) in {result.dataset_uri}; "
                  f"train with: cxr-screen train DATASET --synthetic {escape(result.dataset_uri)} --seed {seed}" +
                  ("" if test_fraction == SynthesizeParameters.default("test_fraction")
                   else f" --test-fraction {test_fraction!r}"))
    if as_json:
        _print_json({"version": result.version, "bundle_uri": result.bundle_uri, "dataset_uri": result.dataset_uri,
                     "manifest_uri": result.manifest_uri, "class": result.synthetic_class, "count": result.count,
                     "quality": result.quality.to_dict()})


@app.command()
def screen(
    incoming_uri: str = typer.Argument(..., help=ScreenParameters.describe("incoming_uri")),
    results: str = _option(ScreenParameters, "results_uri", "--results", envvar="CXR_RESULTS"),
    model_store: str = _option(ScreenParameters, "model_store_uri", "--model-store", envvar="CXR_MODEL_STORE"),
    model_version: str = _option(ScreenParameters, "model_version"),
    batch_size: int = _option(ScreenParameters, "batch_size", envvar="CXR_SCREEN_BATCH_SIZE"),
    chunk_size: int = _option(ScreenParameters, "chunk_size", envvar="CXR_SCREEN_CHUNK_SIZE"),
    limit: int | None = _option(ScreenParameters, "limit"),
    explain: str = _option(ScreenParameters, "explain"),
    engine: str = _option(ScreenParameters, "engine", envvar="CXR_SCREEN_ENGINE"),
    max_file_bytes: int = _option(ScreenParameters, "max_file_bytes", envvar="CXR_SCREEN_MAX_FILE_BYTES"),
    decode_timeout_seconds: float = _option(ScreenParameters, "decode_timeout_seconds", envvar="CXR_SCREEN_DECODE_TIMEOUT_SECONDS"),
    abandoned_after_minutes: float = _option(ScreenParameters, "abandoned_after_minutes", envvar="CXR_SCREEN_ABANDONED_AFTER_MINUTES"),
    chunk_timeout_minutes: float = _option(ScreenParameters, "chunk_timeout_minutes", envvar="CXR_SCREEN_CHUNK_TIMEOUT_MINUTES"),
    frontal_chest_only: bool = _option(ScreenParameters, "frontal_chest_only"),
    deidentify: bool = _option(ScreenParameters, "deidentify"),
    workers: int | None = _option(ScreenParameters, "workers", envvar="CXR_SCREEN_WORKERS"),
    dask_address: str | None = _option(ScreenParameters, "dask_address", envvar="CXR_DASK_ADDRESS"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (the rest "
                                                         "goes to stderr)."),
) -> None:
    """Screen the images not yet screened by the model, and write predictions and a report."""
    params = _validated(ScreenParameters, incoming_uri=incoming_uri, results_uri=results, model_store_uri=model_store,
                        model_version=model_version, batch_size=batch_size, chunk_size=chunk_size, limit=limit,
                        explain=explain, engine=engine, max_file_bytes=max_file_bytes,
                        decode_timeout_seconds=decode_timeout_seconds, abandoned_after_minutes=abandoned_after_minutes,
                        chunk_timeout_minutes=chunk_timeout_minutes, frontal_chest_only=frontal_chest_only,
                        deidentify=deidentify, workers=workers, dask_address=dask_address)
    if deidentify:
        from imaging.dicom_identity import deidentify_key

        with _clean_errors():
            deidentify_key()  # no key: one line now, before any input is read
    _json_mode(as_json)
    lifeline.arm()
    from flows import screen as screening

    with _clean_errors(), Progress(console=console) as progress:
        bar = progress.add_task("Screening", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        screening.progress_listeners.append(advance)
        try:
            summary = screening.screen(params)
        finally:
            screening.progress_listeners.remove(advance)
    console.print(
        f"Screened {summary.screened} new image(s) with model {summary.model_version}: "
        f"{summary.flagged} flagged, {summary.rejected} rejected, {summary.already_screened} already done."
    )
    if summary.engine:
        console.print(f"Engine: {summary.engine} ({summary.engine_reason})")
    for run_id in summary.recovered_runs:
        console.print(f"[yellow]Run {run_id} had died without writing its outputs; they are now written, "
                      f"with status 'abandoned', in its own run folder.[/yellow]")
    console.print(f"Report: {summary.outputs['report.html']}")
    if as_json:
        _print_json(summary.to_dict())


@app.command()
def audit(
    dataset_uri: str = typer.Argument(..., help=AuditParameters.describe("dataset_uri")),
    by: str = typer.Option(..., help=AuditParameters.describe("by")),
    output: str = _option(AuditParameters, "output_uri", "--output"),
    epochs: int = _option(AuditParameters, "epochs"),
    input_size: int = _option(AuditParameters, "input_size"),
    weights: str = _option(AuditParameters, "weights"),
    augment_draws: int = _option(AuditParameters, "augment_draws"),
    batch_size: int = _option(AuditParameters, "batch_size"),
    seed: int = _option(AuditParameters, "seed"),
    positive: str = _option(AuditParameters, "positive"),
) -> None:
    """Leave each level of a manifest column out of training in turn; score the level it never saw."""
    params = _validated(AuditParameters, dataset_uri=dataset_uri, by=by, output_uri=output, epochs=epochs,
                        input_size=input_size, weights=weights, augment_draws=augment_draws, batch_size=batch_size,
                        seed=seed, positive=positive)
    lifeline.arm()
    from flows.audit import audit as audit_flow

    with _clean_errors():
        result = audit_flow(params)
    table = Table(title=f"Leave one {result.variable} out")
    for column in ("left out", "images", "positives", "AUC there", "flagged there", "test AUC of the rest", "note"):
        table.add_column(column, justify="left" if column in ("left out", "note") else "right")
    for fold in result.folds:
        table.add_row(escape(fold["level"]), str(fold["images"]), str(fold.get("positives") or 0),
                      _shown(fold.get("auc")), _shown(fold.get("flagged_share")), _shown(fold.get("test_auc")),
                      escape(fold.get("note", "")))
    console.print(table)
    console.print(f"Table: {result.outputs['table.csv']}  Plot: {result.outputs['plot.png']}")


@app.command()
def evaluate(
    dataset_uri: str = typer.Argument(..., help=EvaluateParameters.describe("dataset_uri")),
    model_store: str = _option(EvaluateParameters, "model_store_uri", "--model-store", envvar="CXR_MODEL_STORE"),
    model_version: str = _option(EvaluateParameters, "model_version"),
    output: str | None = _option(EvaluateParameters, "output_uri", "--output"),
    where: list[str] | None = typer.Option(None, "--where", help=EvaluateParameters.describe("where")),
    strata: str | None = typer.Option(None, help="COL[,COL]: " + EvaluateParameters.describe("strata")),
    min_auc: float | None = _option(EvaluateParameters, "min_auc"),
    min_specificity: float | None = _option(EvaluateParameters, "min_specificity"),
    acceptance_bound: str | None = _option(EvaluateParameters, "acceptance_bound"),
    bootstrap: int = _option(EvaluateParameters, "bootstrap"),
    seed: int = _option(EvaluateParameters, "seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation as one JSON object on stdout (the rest "
                                                         "goes to stderr)."),
) -> None:
    """Score a labelled site dataset with a stored version; keep the evaluation beside it (signed like its card)."""
    params = _validated(EvaluateParameters, dataset_uri=dataset_uri, model_store_uri=model_store,
                        model_version=model_version, output_uri=output, where=where or [],
                        strata=None if strata is None else [name.strip() for name in strata.split(",") if name.strip()],
                        min_auc=min_auc, min_specificity=min_specificity, acceptance_bound=acceptance_bound,
                        bootstrap=bootstrap, seed=seed)
    _json_mode(as_json)
    lifeline.arm()
    from flows.evaluate import evaluate as evaluate_flow

    with _clean_errors():
        result = evaluate_flow(params)
    record, overall = result.record, result.record["overall"]
    interval = overall["auc_ci"]
    console.print(f"Evaluation [bold]{record['evaluation_id']}[/bold] of model [bold]{record['model_version']}[/bold] "
                  f"on {escape(record['dataset']['uri'])}: {record['images']} image(s) scored, "
                  f"{len(record['rejected'])} rejected")
    console.print(f"  AUC {_shown(overall['auc'])}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
                                                         if interval and interval[0] is not None else "") +
                  f"; sensitivity {_shown(overall['sensitivity'])} / specificity {_shown(overall['specificity'])} at "
                  f"threshold {record['threshold']:.3f}; ECE {_shown(record['calibration']['ece'])}")
    for name, found in record["strata"].items():
        console.print(f"  within {escape(name)}: AUC {_shown(found['within_auc'])}; {escape(name)} alone "
                      f"(cross-fitted) {_shown(found['metadata_baseline_auc'])}")
    outside = [f"{escape(row['figure'])} {_shown(row['site'])} ({row['where']} the card's "
               f"{row['card_ci'][0]:.3f}-{row['card_ci'][1]:.3f})" for row in record["comparison"]
               if row["inside"] is False]
    console.print("  against the card's test figures: " + ("; ".join(outside) if outside else
                                                            "every figure with an interval falls inside it"))
    console.print(f"Kept: {escape(result.outputs['evaluation'])}" +
                  (f"; also in {escape(result.outputs['output'])}" if "output" in result.outputs else ""))
    for line in record["warnings"]:
        console.print(f"[bold yellow]Warning:[/bold yellow] {escape(line)}")
    style = "green" if result.fit else "bold red"
    console.print(f"[{style}]{escape(record['verdict']['line'])}[/{style}]")  # last, where a reader's eye lands
    if as_json:
        _print_json(record)


@app.command("validate-engines")
def validate_engines(
    version: str = typer.Argument("production", help="A version in the store, or 'production'."),
    model_store: str = typer.Option("models", "--model-store", envvar="CXR_MODEL_STORE",
                                    help="Model store (folder or s3://)."),
    dataset: str | None = typer.Option(None, help="The version's dataset, if it moved (default: the card's)."),
) -> None:
    """Check each engine (bf16, int8) against fp32 on a version's test split; record which may serve it."""
    lifeline.arm()
    from flows.validate_engines import validate_engines as validate_flow

    with _clean_errors():
        checks = validate_flow(model_store, version, dataset)
    table = Table(title="Engines against fp32 on the test split")
    for column in ("engine", "images", "flags agree", "max |p difference|", "AUC difference", "may serve"):
        table.add_column(column, justify="left" if column in ("engine", "may serve") else "right")
    for check in checks:
        table.add_row(check.engine, str(check.images), f"{check.flag_agreement:.1%}",
                      f"{check.max_probability_difference:.4f}", _shown(check.auc_difference),
                      "yes" if check.passed else "[red]no: failed the gate[/red]")
    console.print(table)


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
def demo(
    workdir: str = typer.Option("demo-run", help="Where the demo writes its data, models and results."),
) -> None:
    """Train on synthetic chest phantoms and screen new ones: no data, server or internet needed."""
    lifeline.arm()
    from flows.demo import demo as demo_flow

    with _clean_errors():
        result = demo_flow(workdir=workdir)
    trained, screened = result.trained, result.screened
    console.rule("Demo finished")
    console.print(f"Model {trained.version} (test AUC {trained.card.metrics['positive']['auc']:.3f}): {trained.bundle_uri}")
    from store import storage

    bundle = trained.bundle_uri
    console.print("  " + ", ".join(sorted(storage.relative_to(uri, bundle) for uri in storage.list_files(bundle))))
    console.print(
        f"Screened {screened.screened} new image(s): {screened.flagged} flagged for review, "
        f"{screened.rejected} rejected (see the report for the reason)."
    )
    console.print(f"  predictions.csv, predictions.jsonl, summary.json in {screened.outputs['report.html'].rsplit('/', 1)[0]}")
    console.print(f"[bold]Report: {screened.outputs['report.html']}[/bold]")


stack_app = typer.Typer(help="A local stack: Prefect server and UI, S3 endpoint, workers, deployments.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
STACK_DIR = typer.Option(".stack", envvar="CXR_STACK_DIR", help="Folder for the stack's state and logs.")


@stack_app.command("up")
def stack_up(
    folder: Path = STACK_DIR,
    port: int = typer.Option(4200, help="Port of the Prefect server and UI (127.0.0.1)."),
    s3_port: int = typer.Option(5000, help="Port of the moto S3 server (127.0.0.1), when one is started."),
    workers: int = typer.Option(0, min=0, help="Also start a Dask scheduler and this many Dask worker processes "
                                               "(127.0.0.1) that nightly-screening fans its chunks out to. "
                                               "0: chunks run in the flow run's process."),
    dask_port: int = typer.Option(8786, help="Port of the Dask scheduler (127.0.0.1), with --workers."),
    s3_only: bool = typer.Option(False, "--s3-only", help="Start only the local S3 endpoint, with its stored data: "
                                                          "no Prefect server, workers or deployments."),
) -> None:
    """Start server, S3 endpoint (unless AWS_ENDPOINT_URL names one), cpu and gpu workers, with --workers N
    a Dask scheduler and N Dask workers; deploy. Writes the client environment to <folder>/env."""
    import shlex

    from deployments import stack
    from deployments.settings import Settings

    try:
        state = stack.up(folder, Settings(), port=port, s3_port=s3_port, echo=console.print, workers=workers,
                         dask_port=dask_port, s3_only=s3_only)
    except ValueError as error:  # refused: the settings or a stack already running
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_INPUT) from None
    except RuntimeError as error:  # a process did not start
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_RUNTIME) from None
    if state["ui"]:
        console.print(f"Stack is up. Prefect UI: [bold]{state['ui']}[/bold]")
    else:
        console.print(f"Local S3 is up at {state['environment']['AWS_ENDPOINT_URL']} (no Prefect server).")
    if workers:
        console.print(f"Dask scheduler: {state['environment']['CXR_DASK_ADDRESS']} with {workers} worker(s); "
                      "nightly-screening fans its chunks out to it.")
    if "s3" in state["processes"]:
        data = stack.stored_data(folder)
        console.print(f"S3 data: {escape(data) if data else 'none stored yet'}. Kept across 'stack down' and "
                      "'stack up'; 'stack down --wipe' removes it.", soft_wrap=True)
    console.print(f"State and logs: {escape(state['folder'])}. Commands run here find the stack; elsewhere, "
                  "point a shell at it with:")
    # One short line, printed as is: a long line of exports wrapped by the terminal lost variables when pasted.
    console.print(f"  source {shlex.quote(state['env_file'])}", markup=False, highlight=False, soft_wrap=True)


@stack_app.command("status")
def stack_status(folder: Path = STACK_DIR) -> None:
    """Which of the stack's processes are running, and the local S3's stored data."""
    import shlex

    from deployments import stack

    processes = stack.status(folder)
    data = stack.stored_data(folder)
    if not processes:
        console.print(f"No stack recorded in {escape(str(folder))}.")
        if data:
            console.print(f"S3 data kept for the next 'stack up': {escape(data)}", soft_wrap=True)
        raise typer.Exit(code=1)
    for name, alive in processes.items():
        console.print(f"{name:16s} {'[green]running[/green]' if alive else '[red]stopped[/red]'}")
    if data:
        console.print(f"S3 data: {escape(data)}", soft_wrap=True)
    env_file = folder / stack.ENV_FILE
    if env_file.exists():
        console.print(f"Client environment: source {shlex.quote(str(env_file.resolve()))}", markup=False,
                      highlight=False, soft_wrap=True)
    if not all(processes.values()):
        raise typer.Exit(code=1)


@stack_app.command("down")
def stack_down(
    folder: Path = STACK_DIR,
    wipe: bool = typer.Option(False, "--wipe", help="Also remove the stored state: the local S3's data (models, "
                                                    "ledger, results, datasets) and Prefect's run history."),
) -> None:
    """Stop exactly the processes that 'stack up' started; the local S3 saves its data as it stops."""
    from deployments import stack

    stopped = stack.down(folder)
    console.print(f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running.")
    if not wipe:
        data = stack.stored_data(folder)
        if data and "s3" in stopped:
            console.print(f"S3 data kept for the next 'stack up': {escape(data)}", soft_wrap=True)
        return
    try:
        removed = stack.wipe(folder)
    except ValueError as error:  # the stack runs again (started by someone else meanwhile)
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_INPUT) from None
    for what in removed:
        console.print(f"Removed {escape(what)}", soft_wrap=True)
    if not removed:
        console.print("No stored state to remove.")


def _json_mode(on: bool) -> None:
    """With --json, everything meant for people goes to stderr, so stdout holds one JSON object."""
    if on:
        console.file = sys.stderr


def _print_json(result: dict) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")


def _require_api() -> None:
    """Commands that talk to deployments need a Prefect server that lasts: without one, Prefect
    would start a temporary server, and a run or an event would be lost with it."""
    import httpx

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        console.print("[red]error:[/red] no Prefect API: start the local stack ('cxr-screen stack up') "
                      "or set PREFECT_API_URL to your Prefect server")
        raise typer.Exit(code=EXIT_INPUT)
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as error:
        console.print(f"[red]error:[/red] the Prefect API at {escape(url)} does not answer ({escape(str(error))})")
        raise typer.Exit(code=EXIT_INPUT) from None


def _use_stack_if_up(folder: Path) -> None:
    """Point Prefect (and boto3) at the local stack unless an API is configured already."""
    from deployments import stack

    if not os.environ.get("PREFECT_API_URL") and any(stack.status(folder).values()):
        for key, value in stack.client_environment(folder.resolve()).items():
            os.environ.setdefault(key, value)


@app.command()
def deploy() -> None:
    """Create the work pools and (re)deploy nightly-screening, retrain and synthesize to the configured Prefect API."""
    _use_stack_if_up(Path(os.environ.get("CXR_STACK_DIR", ".stack")))
    _require_api()
    from cli.deploy import main as deploy_main

    deploy_main()


@app.command()
def retrain(
    folder: Path = STACK_DIR,
    epochs: int | None = typer.Option(None, help="Override the deployment's stage-1 epochs."),
    input_size: int | None = typer.Option(None, help="Override the deployment's input size."),
    weights: str | None = typer.Option(None, help="Override the deployment's base weights."),
    follow: bool = typer.Option(True, help="Wait for the run to end, printing its state changes."),
) -> None:
    """Start the retrain deployment through the Prefect API and follow it to its end."""
    _use_stack_if_up(folder)
    _require_api()
    from deployments.deploy import RETRAIN
    from deployments.follow import follow_run, start_run

    overrides = {k: v for k, v in {"epochs": epochs, "input_size": input_size, "weights": weights}.items()
                 if v is not None}
    try:
        run = start_run(RETRAIN, overrides)
    except RuntimeError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_INPUT) from None
    console.print(f"Started {RETRAIN}: flow run {run.name} ({run.id})")
    if follow:
        state = follow_run(run.id, echo=console.print)
        if not state.is_completed():
            raise typer.Exit(code=EXIT_RUNTIME)


@app.command("dataset-updated")
def dataset_updated(
    dataset_uri: str = typer.Argument(None, help="The dataset that changed (default: the configured one)."),
    folder: Path = STACK_DIR,
) -> None:
    """Emit the event cxr.dataset.updated, which starts the retrain deployment."""
    _use_stack_if_up(folder)
    _require_api()
    from deployments.follow import emit_dataset_updated
    from deployments.settings import Settings

    uri = dataset_uri or Settings().dataset
    emit_dataset_updated(uri)
    console.print(f"Emitted cxr.dataset.updated for {uri}")


@contextlib.contextmanager
def _clean_errors():
    """Failures end with one line naming the problem (Prefect has logged the details) and an exit
    code that says whose move it is: 3 for the input or configuration (a missing folder, an
    unsupported location, no production model, a dataset or model this code cannot use), 1 for
    the rest (a failure at run time, after its retries). Usage errors exit 2 before anything starts."""
    from model.bundle import BundleError
    from model.network import WeightsUnavailable
    from store.datasets import DatasetError
    from store.storage import StorageError

    try:
        yield
    except (WeightsUnavailable, BundleError, DatasetError, StorageError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_INPUT) from None
    except Exception as error:  # noqa: BLE001 - one line here; the traceback is in Prefect's logs
        console.print(f"[red]error:[/red] {type(error).__name__}: {escape(str(error))}")
        raise typer.Exit(code=EXIT_RUNTIME) from None


if __name__ == "__main__":
    app()
