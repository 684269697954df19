"""``cxr-screen validate-engines``: which engines (bf16, int8) may serve a model version."""

from __future__ import annotations

import typer
from rich.table import Table

from cli import lifeline
from cli.exits import clean_errors
from cli.output import console, shown

__all__ = ["validate_engines"]


def validate_engines(
    version: str = typer.Argument("production", help="A version in the store, or 'production'."),
    model_store: str = typer.Option("models", "--model-store", envvar="CXR_MODEL_STORE",
                                    help="Model store (folder or s3://)."),
    dataset: str | None = typer.Option(None, help="The version's dataset, if it moved (default: the card's)."),
) -> None:
    """Check each engine (bf16, int8) against fp32 on a version's test split; record which may serve it."""
    lifeline.arm()
    from flows.validate_engines import validate_engines as validate_flow

    with clean_errors():
        checks = validate_flow(model_store, version, dataset)
    table = Table(title="Engines against fp32 on the test split")
    for column in ("engine", "images", "flips (outside the band)", "max |p difference|", "AUC difference",
                   "sensitivity / specificity moved (noise)", "may serve", "explanations"):
        table.add_column(column, justify="right" if column in ("images", "max |p difference|", "AUC difference") else "left")
    for check in checks:
        flips = "n/a" if check.flips is None else f"{check.flips} ({check.far_flips}; band {check.probability_difference_q99:.4f})"
        rates = " / ".join("n/a" if change is None else f"{change:.3f} ({noise:.3f})" for change, noise in (
            (check.sensitivity_change, check.sensitivity_noise), (check.specificity_change, check.specificity_noise)))
        explained = ("not checked" if check.explanation_passed is None else
                     f"{'yes' if check.explanation_passed else '[red]no[/red]'}: r {check.explanation_correlation:.3f}, "
                     f"lung share within {check.explanation_lung_share_difference:.3f}")
        table.add_row(check.engine, str(check.images), flips, f"{check.max_probability_difference:.4f}",
                      shown(check.auc_difference), rates, "yes" if check.passed else "[red]no: failed the gate[/red]",
                      explained)
    console.print(table)
