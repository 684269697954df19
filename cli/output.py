"""What the commands print: one console for people, and with --json one JSON object on stdout."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

__all__ = ["JSON_OPTION", "console", "json_mode", "print_json", "shown"]

console = Console()

JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (the rest goes to "
                                                 "stderr).")


def json_mode(on: bool) -> None:
    """With --json, everything meant for people goes to stderr, so stdout holds one JSON object."""
    if on:
        console.file = sys.stderr


def print_json(result: dict) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
