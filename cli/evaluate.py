"""``cxr-screen evaluate``: options from EvaluateParameters."""

from __future__ import annotations

import typer
from rich.markup import escape

from cli import lifeline
from cli.exits import clean_errors
from cli.options import OptionSpec, parameters_command
from cli.output import console, json_mode, print_json, shown
from flows.parameters import EvaluateParameters

__all__ = ["evaluate"]

EVALUATE_OPTIONS = {
    "model_store_uri": OptionSpec(envvar="CXR_MODEL_STORE"),
    "strata": OptionSpec(comma_separated="COL[,COL]"),
}


@parameters_command(EvaluateParameters, arguments=["dataset_uri"], specs=EVALUATE_OPTIONS)
def evaluate(params: EvaluateParameters,
             as_json: bool = typer.Option(False, "--json", help="Print the evaluation as one JSON object on stdout "
                                                                "(the rest goes to stderr).")) -> None:
    """Score a labelled site dataset with a stored version; keep the evaluation beside it (signed like its card)."""
    json_mode(as_json)
    lifeline.arm()
    from flows.evaluate import evaluate as evaluate_flow

    with clean_errors():
        result = evaluate_flow(params)
    record, overall = result.record, result.record["overall"]
    interval = overall["auc_ci"]
    console.print(f"Evaluation [bold]{record['evaluation_id']}[/bold] of model [bold]{record['model_version']}[/bold] "
                  f"on {escape(record['dataset']['uri'])}: {record['images']} image(s) scored, "
                  f"{len(record['rejected'])} rejected")
    console.print(f"  AUC {shown(overall['auc'])}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
                                                        if interval and interval[0] is not None else "") +
                  f"; sensitivity {shown(overall['sensitivity'])} / specificity {shown(overall['specificity'])} at "
                  f"threshold {record['threshold']:.3f}; ECE {shown(record['calibration']['ece'])}")
    for name, found in record["strata"].items():
        console.print(f"  within {escape(name)}: AUC {shown(found['within_auc'])}; {escape(name)} alone "
                      f"(cross-fitted) {shown(found['metadata_baseline_auc'])}")
    outside = [f"{escape(row['figure'])} {shown(row['site'])} ({row['where']} the card's "
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
        print_json(record)
