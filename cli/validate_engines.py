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
    for column in ("engine", "images", "flags agree", "max |p difference|", "AUC difference", "may serve"):
        table.add_column(column, justify="left" if column in ("engine", "may serve") else "right")
    for check in checks:
        table.add_row(check.engine, str(check.images), f"{check.flag_agreement:.1%}",
                      f"{check.max_probability_difference:.4f}", shown(check.auc_difference),
                      "yes" if check.passed else "[red]no: failed the gate[/red]")
    console.print(table)
