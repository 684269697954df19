"""``cxr-screen demo``: train on synthetic phantoms and screen new ones, end to end."""

from __future__ import annotations

import typer

from cli import lifeline
from cli.exits import clean_errors
from cli.output import console

__all__ = ["demo"]


def demo(
    workdir: str = typer.Option("demo-run", help="Where the demo writes its data, models and results."),
) -> None:
    """Train on synthetic chest phantoms and screen new ones: no data, server or internet needed."""
    lifeline.arm()
    from flows.demo import demo as demo_flow

    with clean_errors():
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
