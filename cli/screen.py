"""``cxr-screen screen``: options from ScreenParameters."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import Progress

from cli import lifeline
from cli.exits import clean_errors
from cli.options import OptionSpec, parameters_command
from cli.output import JSON_OPTION, console, json_mode, print_json
from flows.parameters import ScreenParameters

__all__ = ["screen"]

SCREEN_OPTIONS = {
    "results_uri": OptionSpec(envvar="CXR_RESULTS"),
    "model_store_uri": OptionSpec(envvar="CXR_MODEL_STORE"),
    "batch_size": OptionSpec(envvar="CXR_SCREEN_BATCH_SIZE"),
    "chunk_size": OptionSpec(envvar="CXR_SCREEN_CHUNK_SIZE"),
    "engine": OptionSpec(envvar="CXR_SCREEN_ENGINE"),
    "explain": OptionSpec(envvar="CXR_SCREEN_EXPLAIN"),
    "max_file_bytes": OptionSpec(envvar="CXR_SCREEN_MAX_FILE_BYTES"),
    "decode_timeout_seconds": OptionSpec(envvar="CXR_SCREEN_DECODE_TIMEOUT_SECONDS"),
    "abandoned_after_minutes": OptionSpec(envvar="CXR_SCREEN_ABANDONED_AFTER_MINUTES"),
    "chunk_timeout_minutes": OptionSpec(envvar="CXR_SCREEN_CHUNK_TIMEOUT_MINUTES"),
    "deidentify": OptionSpec(flags="--deidentify/--no-deidentify"),
    "workers": OptionSpec(envvar="CXR_SCREEN_WORKERS"),
    "drift_window": OptionSpec(envvar="CXR_SCREEN_DRIFT_WINDOW"),
    "since": OptionSpec(envvar="CXR_SCREEN_SINCE"),
    "deliver_to": OptionSpec(envvar="CXR_SCREEN_DELIVER_TO"),
    "uid_root": OptionSpec(envvar="CXR_UID_ROOT"),
    "delivery_max_nights": OptionSpec(envvar="CXR_DELIVERY_MAX_NIGHTS"),
    "dask_address": OptionSpec(envvar="CXR_DASK_ADDRESS"),
}


@parameters_command(ScreenParameters, arguments=["incoming_uri"], specs=SCREEN_OPTIONS)
def screen(params: ScreenParameters, as_json: bool = JSON_OPTION) -> None:
    """Screen the images not yet screened by the model, and write predictions and a report."""
    if params.deidentify:
        from imaging.dicom_identity import deidentify_key

        with clean_errors():
            deidentify_key()  # no key: one line now, before any input is read
    json_mode(as_json)
    from store import storage

    with clean_errors():  # as Prefect records them: a later run started elsewhere must tell which results they name
        params = params.model_copy(update={name: storage.join(getattr(params, name))
                                           for name in ("incoming_uri", "results_uri", "model_store_uri")})
    lifeline.arm()
    from flows import screen as screening

    with clean_errors(), Progress(console=console) as progress:
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
    if summary.duplicates:
        console.print(f"{summary.duplicates} image(s) were DICOM instances already screened under another location "
                      "(same SOP Instance UID): not screened again; their rows say where (status duplicate).")
    if summary.engine:
        console.print(f"Engine: {summary.engine} ({summary.engine_reason})")
    for run_id in summary.recovered_runs:
        console.print(f"[yellow]Run {run_id} had died without writing its outputs; they are now written, "
                      f"with status 'abandoned', in its own run folder.[/yellow]")
    console.print(f"Report: {summary.outputs['report.html']}")
    from screening.drift import reference_words

    drift = summary.drift or {}
    if drift.get("alarm"):
        failing = ", ".join(test["name"] for test in drift["tests"] if test["alarm"])
        console.print(f"[red]Drift alarm (score {drift['score']:.1f}): {escape(failing)} differ from "
                      f"{escape(reference_words(drift))}; see the report's drift section.[/red]")
    elif drift:
        console.print(f"Drift: no alarm (score {drift['score']:.2f} against {escape(reference_words(drift))}).")
    if summary.damaged:
        console.print(f"[red]{summary.damaged} stored files were damaged, forged or inconsistent and were skipped or "
                      f"refused (named in the report and summary.json); audit with 'cxr-screen ledger check'.[/red]")
    if summary.unsigned_warning:
        console.print(f"[red]{escape(summary.unsigned_warning)}[/red]")
    if as_json:
        print_json(summary.to_dict())

