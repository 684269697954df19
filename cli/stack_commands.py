"""The commands that run against the local stack or a Prefect server: ``stack up/status/down``,
``deploy``, ``retrain`` and ``dataset-updated``."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from cli.exits import EXIT_INPUT, EXIT_RUNTIME, clean_errors
from cli.output import console

__all__ = ["dataset_updated", "deploy", "require_prefect_api", "retrain", "stack_app"]

stack_app = typer.Typer(help="A local stack: Prefect server and UI, S3 endpoint, workers, deployments, and "
                             "optionally a local PACS (Orthanc).",
                        no_args_is_help=True)
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
    database: str = typer.Option("sqlite", help="Prefect's database: sqlite (a file in the stack's folder) or "
                                                "postgres (a PostgreSQL server the stack starts, its data in "
                                                "<folder>/postgres, or the one --database-url names)."),
    database_url: str | None = typer.Option(None, envvar="CXR_STACK_DATABASE_URL", show_default=False,
                                            help="An existing PostgreSQL database for Prefect, "
                                                 "postgresql://user:password@host:port/database. Give it in the "
                                                 "environment: a command line is visible to every user."),
    database_port: int = typer.Option(5432, help="Port of the stack's PostgreSQL server (127.0.0.1), "
                                                 "with --database postgres."),
    pacs: bool = typer.Option(False, "--pacs", help="Also start Orthanc as the site's local PACS (Debian's orthanc "
                                                    "and orthanc-dicomweb), its studies in <folder>/orthanc, user cxr "
                                                    "with the password in <folder>/pacs-password; the workers and the "
                                                    "client environment get them. Orthanc 1.10 cannot bind to one "
                                                    "address: it listens on every interface and refuses other "
                                                    "machines (HTTP 403; DICOM only from known AE titles on "
                                                    "127.0.0.1)."),
    pacs_port: int = typer.Option(8042, min=1, max=65535, help="Port of the PACS's HTTP and DICOMweb server, with --pacs "
                                                                "(Debian's own Orthanc service takes 8042: stop it or choose another)."),
    pacs_dicom_port: int = typer.Option(4242, min=1, max=65535, help="Port of the PACS's DICOM (C-STORE) server, with --pacs."),
) -> None:
    """Start server, S3 endpoint (unless AWS_ENDPOINT_URL names one), cpu and gpu workers, with --workers N
    a Dask scheduler and N Dask workers, with --pacs Orthanc; deploy. Writes the client environment to <folder>/env."""
    import shlex

    from deployments import stack
    from deployments.settings import Settings

    try:
        state = stack.up(folder, Settings(), port=port, s3_port=s3_port, echo=console.print, workers=workers,
                         dask_port=dask_port, s3_only=s3_only, database=database,
                         database_url=database_url, database_port=database_port, pacs=pacs, pacs_port=pacs_port,
                         pacs_dicom_port=pacs_dicom_port)
    except ValueError as error:  # refused: the settings, a stack already running, a state file not trusted
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=EXIT_INPUT) from None
    except RuntimeError as error:  # a process did not start
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=EXIT_RUNTIME) from None
    if state["ui"]:
        console.print(f"Stack is up. Prefect UI: [bold]{state['ui']}[/bold] (log in with PREFECT_API_AUTH_STRING "
                      f"from the client environment). Prefect's database: {escape(state['database'])}.", soft_wrap=True)
    else:
        console.print(f"Local S3 is up at {state['environment']['AWS_ENDPOINT_URL']} (no Prefect server).")
    if workers:
        console.print(f"Dask scheduler: {state['environment']['CXR_DASK_ADDRESS']} with {workers} worker(s); "
                      "nightly-screening fans its chunks out to it.")
    if "pacs" in state:
        _show_pacs(state["pacs"])
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

    processes = _stack_call(stack.status, folder)
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
                                                    "ledger, results, datasets), Prefect's run history and the "
                                                    "PACS's studies."),
) -> None:
    """Stop exactly the processes that 'stack up' started; the local S3 saves its data as it stops."""
    from deployments import stack

    stopped = _stack_call(stack.down, folder)
    console.print(f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running.")
    if not wipe:
        data = stack.stored_data(folder)
        if data and "s3" in stopped:
            console.print(f"S3 data kept for the next 'stack up': {escape(data)}", soft_wrap=True)
        if "orthanc" in stopped:
            console.print(f"PACS studies kept in {escape(str(folder.resolve() / stack.PACS_DATA))} for the next "
                          "'stack up --pacs'; 'stack down --wipe' removes them.", soft_wrap=True)
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


def _show_pacs(pacs: dict[str, str]) -> None:
    """Where the stack's PACS answers; its password is named by its file, never printed."""
    console.print(f"PACS (Orthanc): DICOMweb {escape(pacs['dicomweb'])} (CXR_STACK_PACS in the client environment), "
                  f"DICOM {escape(str(pacs['dicom']))} (store and echo only, from the workers' AE title on 127.0.0.1); "
                  f"user cxr, password in {escape(pacs['password_file'])}. It listens on every interface (Orthanc 1.10 "
                  "cannot bind to one address) and refuses other machines over HTTP: block its two ports at the "
                  "site's firewall.", soft_wrap=True)


def _stack_call(function, folder: Path):
    """``function(folder)``; a stack state that is not trusted or is damaged ends the command with
    one line naming the file (exit 3), and nothing is stopped or used."""
    try:
        return function(folder)
    except ValueError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=EXIT_INPUT) from None


def _require_api() -> None:
    """Commands that talk to deployments need a Prefect server that lasts: without one, Prefect
    would start a temporary server, and a run or an event would be lost with it. The API and its
    credentials come from the environment or the active Prefect profile, as Prefect's clients take them."""
    import base64

    import httpx
    from prefect.settings import get_current_settings

    settings = get_current_settings().api

    def secret(variable: str, value) -> str | None:
        return os.environ.get(variable) or (value.get_secret_value() if value else None)

    url = os.environ.get("PREFECT_API_URL") or settings.url
    if not url:
        console.print("[red]error:[/red] no Prefect API: start the local stack ('cxr-screen stack up') "
                      "or set PREFECT_API_URL to your Prefect server")
        raise typer.Exit(code=EXIT_INPUT)
    # An authenticated call, not the health check: a server that wants credentials answers its
    # health check to anyone, and a run started without them would fail at its first call.
    credentials, key = secret("PREFECT_API_AUTH_STRING", settings.auth_string), secret("PREFECT_API_KEY", settings.key)
    headers = ({"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials
               else {"Authorization": f"Bearer {key}"} if key else None)
    try:
        response = httpx.get(url.rstrip("/") + "/admin/version", timeout=5, headers=headers)
    except httpx.HTTPError as error:
        console.print(f"[red]error:[/red] the Prefect API at {escape(url)} does not answer ({escape(str(error))})")
        raise typer.Exit(code=EXIT_INPUT) from None
    if response.status_code in (401, 403):
        given = "PREFECT_API_AUTH_STRING is refused" if credentials else "PREFECT_API_KEY is refused" if key else \
            "set PREFECT_API_AUTH_STRING"
        console.print(f"[red]error:[/red] the Prefect API at {escape(url)} wants credentials: {given} (the local "
                      "stack's are in its client environment, <stack folder>/env)", soft_wrap=True)
        raise typer.Exit(code=EXIT_INPUT)
    if response.status_code >= 500:  # a 404 is an API without that route (Prefect Cloud): it answered
        console.print(f"[red]error:[/red] the Prefect API at {escape(url)} answered {response.status_code}")
        raise typer.Exit(code=EXIT_INPUT)


def _use_stack_if_up(folder: Path) -> None:
    """Point Prefect (and boto3) at the local stack unless an API is configured already."""
    from deployments import stack

    if not os.environ.get("PREFECT_API_URL") and any(_stack_call(stack.status, folder).values()):
        environment = _stack_call(stack.client_environment, folder.resolve())
        if "CXR_DICOMWEB_USER" in environment:
            os.environ.pop("CXR_DICOMWEB_TOKEN", None)  # another PACS's, which store/dicomweb.py would send first
        for key, value in environment.items():
            os.environ.setdefault(key, value)


def require_prefect_api() -> None:
    """The local stack's API when it is up and none is configured; exit 3 without a lasting Prefect API."""
    _use_stack_if_up(Path(os.environ.get("CXR_STACK_DIR", ".stack")))
    _require_api()


def deploy() -> None:
    """Create the work pools and (re)deploy nightly-screening, retrain and synthesize to the configured Prefect API."""
    _use_stack_if_up(Path(os.environ.get("CXR_STACK_DIR", ".stack")))
    _require_api()
    from cli.deploy import main as deploy_main

    with clean_errors():  # a notification block that cannot be used: one line, exit 3
        deploy_main()


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
