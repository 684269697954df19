"""``cxr-screen dataset``: describe a labelled dataset and the train/test split training would make."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from cli.exits import EXIT_INPUT
from cli.output import JSON_OPTION, console, json_mode, print_json
from flows.parameters import TrainParameters

__all__ = ["dataset"]


def dataset(
    uri: str = typer.Argument(..., help="Labelled dataset: class sub-folders or a manifest.csv (path, file:// or s3://)."),
    # The split training makes: its defaults.
    test_fraction: float = typer.Option(TrainParameters.default("test_fraction"),
                                        help=TrainParameters.describe("test_fraction")),
    seed: int = typer.Option(TrainParameters.default("seed"), help="Seed of the train/test split."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Describe a labelled dataset: classes, patients, the train/test split, fingerprint, duplicates."""
    json_mode(as_json)
    from store.datasets import (
        DatasetError,
        discover_dataset,
        find_duplicates,
        fingerprint,
        hash_images,
        split_dataset,
    )
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
        print_json({"uri": uri, "source": found.source, "classes": counts, "images": len(items),
                    "patients": len({i.patient_id or i.uri for i in items}), "fingerprint": fingerprint(items),
                    "ignored": len(found.ignored), "duplicates": report.lines()})
