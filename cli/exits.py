"""Exit codes, and the one line a failed command ends with (README, "Commands")."""

from __future__ import annotations

import contextlib

import typer
from rich.markup import escape

from cli.output import console

__all__ = ["EXIT_INPUT", "EXIT_RUNTIME", "EXIT_USAGE", "clean_errors"]

# 2 is click's own for usage errors.
EXIT_RUNTIME, EXIT_USAGE, EXIT_INPUT = 1, 2, 3


@contextlib.contextmanager
def clean_errors():
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
