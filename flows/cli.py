"""The ``cxr-screen`` command line: one sub-command per job."""

from __future__ import annotations

import os

# Set before Prefect is imported anywhere: no telemetry, and quiet TensorFlow start-up.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

app = typer.Typer(
    help="Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


@app.callback()
def main() -> None:
    """Chest X-ray screening: VGG16 transfer learning and nightly batch screening on Prefect."""


@app.command()
def dataset(
    uri: str = typer.Argument(..., help="Labelled dataset: class sub-folders or a manifest.csv (path, file:// or s3://)."),
    test_fraction: float = typer.Option(0.2, help="Share of patients held out for testing."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
) -> None:
    """Describe a labelled dataset: classes, patients, the train/test split, fingerprint, duplicates."""
    from tasks.datasets import DatasetError, discover_dataset, find_duplicates, fingerprint, hash_images, split_dataset
    from tasks.storage import StorageError

    try:
        found = discover_dataset(uri)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("Hashing images", total=len(found.items))
            items = hash_images(found.items, on_done=lambda: progress.advance(task))
        split = split_dataset(items, test_fraction=test_fraction, seed=seed)
    except (DatasetError, StorageError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None

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


if __name__ == "__main__":
    app()
