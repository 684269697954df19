"""``cxr-screen models``: the model store for people: list the versions, show one (with its site
evaluations), promote one (with ``--require-evaluation``, only after a passing site evaluation),
roll back.

Each change of production is recorded in production.json's history with who made it (the OS
user, or ``--by``) and why (``--reason``), and is written with a compare-and-swap: if production
changed between reading and writing (another operator, a training), nothing is written and the
command says who changed it. A bundle is checked (signature where one is required, every file's
sha256) before it becomes production. A store used without a signing key is said to be unsigned,
on stderr (and as ``unsigned_warning`` in ``--json``), by every command.

One damaged card (not JSON, a number beyond what JSON carries, a field of the wrong type) is one
``unusable`` row of ``list``, naming its file; the other versions are listed.

Exit codes: 2 usage (a missing or blank ``--reason``), 3 input or configuration (an unknown version,
a damaged bundle, nothing to roll back to, production changed meanwhile, an unreachable store
location), 1 anything else.
"""

from __future__ import annotations

import contextlib
import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["models_app"]

models_app = typer.Typer(help="The model store: list versions, show one, promote one to production, roll back.",
                         no_args_is_help=True)
console = Console(soft_wrap=True)  # a long path stays one line, to copy
errors = Console(stderr=True, soft_wrap=True)  # stdout stays one JSON object with --json

STORE = typer.Option("models", "--model-store", envvar="CXR_MODEL_STORE", help="Model store (folder or s3://).")
AS_JSON = typer.Option(False, "--json", help="Print the result as one JSON object.")
BY = typer.Option(None, "--by", help="Who makes the change, for the history (default: the OS user).")


def _reason(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("say why, for the history (it is shown with every later change)")
    return value.strip()


REASON = typer.Option(..., "--reason", callback=_reason, help="Why, recorded in production.json's history.")


@models_app.command("list")
def list_models(model_store: str = STORE, as_json: bool = AS_JSON) -> None:
    """Every version: when made, test metrics, production / previous / candidate, shortcut warnings."""
    unsigned = _warn_unsigned(model_store)
    with _clean_errors():
        production, rows = _summaries(model_store)
    if as_json:
        _print_json({"model_store": model_store, "production": production.version,
                     "production_problem": production.problem, "versions": rows,
                     "history": list(production.history), "unsigned_warning": unsigned})
        return
    if production.problem:
        console.print(f"[yellow]warning:[/yellow] {escape(production.problem)}")
    if not rows:
        console.print(f"No model versions in {escape(model_store)}: train one first (cxr-screen train).")
        return
    table = Table(title=f"Model versions in {escape(model_store)}")
    for column in ("version", "created", "status", "test AUC", "sens / spec", "fit", "warnings"):
        table.add_column(column, justify="right" if column in ("test AUC", "warnings") else "left",
                         no_wrap=column != "sens / spec")
    for row in rows:
        scores = (f"{_shown(row['sensitivity'])} / {_shown(row['specificity'])}"
                  if row["problem"] is None else "see below")
        table.add_row(row["version"], row["created_at"][:16].replace("T", " "), _styled(row["status"]),
                      _shown(row["auc"]), scores, {True: "yes", False: "[red]NOT FIT[/red]"}.get(row["fit"], ""),
                      str(len(row["warnings"])) if row["warnings"] else "")
    console.print(table)
    if production.version:
        last = production.history[-1] if production.history else {}
        console.print(f"Production: [bold]{production.version}[/bold] since {escape(str(last.get('at') or 'unknown'))} "
                      f"by {escape(str(last.get('by') or 'unknown'))}: {escape(str(last.get('reason') or ''))}")
    for row in rows:
        for line in row["warnings"]:
            console.print(f"[bold red]Shortcut warning[/bold red] {row['version']}: {escape(line)}")
    for row in rows:
        if row["problem"] is not None:  # one line each, whole, to read or copy
            console.print(f"[red]Unusable[/red] {row['version']}: {escape(row['problem'])}")


@models_app.command("show")
def show_model(version: str = typer.Argument(..., help="A version in the store, or 'production'."),
               model_store: str = STORE, as_json: bool = AS_JSON) -> None:
    """One version's card: data, test metrics, training's decision, production history, site
    evaluations, warnings."""
    from store import evaluations, registry

    unsigned = _warn_unsigned(model_store)
    with _clean_errors():
        production = registry.read_production(model_store)
        card = registry.load_card(model_store, version)
        status = _status(card, production, _card_or_none(model_store, production.version))
        evaluated = [_evaluation_row(found) for found in evaluations.list_evaluations(model_store, card)]
    history = [entry for entry in production.history if card.version in (entry["version"], entry.get("previous"))]
    if as_json:
        _print_json({**json.loads(card.to_json()), "registry": {"status": status, "production": production.version,
                                                                "history": history},
                     "evaluations": evaluated, "unsigned_warning": unsigned})
        return
    positive, metrics = _positive(card), card.metrics
    console.print(f"Model [bold]{card.version}[/bold]: {_styled(status)}")
    console.print(f"  created {card.created_at or 'unknown'}; classes {', '.join(map(escape, card.classes))}; flags "
                  f"{escape(card.positive_class)} at probability >= {card.threshold:.3f}; input {card.input_size} px")
    if positive:
        console.print(f"  test: accuracy {_shown(metrics.get('accuracy'))}, AUC {_shown(positive.get('auc'))}, "
                      f"sensitivity {_shown(positive.get('sensitivity_at_threshold'))} / specificity "
                      f"{_shown(positive.get('specificity_at_threshold'))} on {metrics.get('images', '?')} images")
    dataset = card.dataset
    console.print(f"  data: {escape(str(dataset.get('uri', 'unknown')))} ({dataset.get('images', '?')} images, "
                  f"fingerprint {str(dataset.get('fingerprint', '?'))[:12]}); weights {card.weights.get('origin')}")
    if card.promotion:
        decided = "promote" if card.promotion.get("promoted") else "not promote"
        console.print(f"  training decided to {decided}: {escape(str(card.promotion.get('reason', '')))}")
    for entry in history:
        became = entry["version"] == card.version
        console.print(f"  {entry.get('at') or 'unknown'}: {'made production' if became else 'replaced'} by "
                      f"{entry.get('action', 'promote')} ({escape(str(entry.get('by') or 'unknown'))}: "
                      f"{escape(str(entry.get('reason') or ''))})")
    if evaluated:
        console.print("  site evaluations (the latest decides where one is required):")
    for row in evaluated:
        if row["problem"]:
            console.print(f"    {escape(row['evaluation_id'])}: [red]unusable[/red]: {escape(row['problem'])}")
            continue
        interval = row["auc_ci"]
        shown = _shown(row["auc"]) + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
                                      if interval and interval[0] is not None else "")
        console.print(f"    {row['evaluation_id']}: {row['created_at']} on {escape(row['dataset_uri'])} (fingerprint "
                      f"{escape(row['dataset_fingerprint'][:12])}, {row['images']} images): AUC {shown}: "
                      + ("[green]fit[/green]" if row["fit"] else "[red]not fit[/red]"))
    for line in card.shortcut_warnings:
        console.print(f"[bold red]Shortcut warning:[/bold red] {escape(line)}")
    if _fit(card) is not None:
        line = escape(str(card.validity["fitness"].get("line", "")))
        console.print(f"[green]{line}[/green]" if _fit(card) else f"[bold red]{line}[/bold red]")


def _evaluation_row(found) -> dict:
    """One stored evaluation, in short: when, on what, AUC, fit; or why it cannot be used."""
    row = {"evaluation_id": found.evaluation_id, "uri": found.uri, "problem": found.problem, "fit": found.fit}
    if found.record is None:
        return {**row, "created_at": None, "dataset_uri": None, "dataset_fingerprint": None, "images": None,
                "auc": None, "auc_ci": None, "verdict": None}
    record = found.record
    return {**row, "created_at": record["created_at"], "dataset_uri": record["dataset"]["uri"],
            "dataset_fingerprint": record["dataset"]["fingerprint"], "images": record["images"],
            "auc": record["overall"].get("auc"), "auc_ci": record["overall"].get("auc_ci"),
            "verdict": found.verdict.line}


@models_app.command("promote")
def promote_model(version: str = typer.Argument(..., help="The version to make production."),
                  reason: str = REASON, by: str | None = BY, model_store: str = STORE,
                  require_evaluation: bool = typer.Option(
                      False, "--require-evaluation", help="Refuse unless the version's latest site evaluation "
                                                          "(cxr-screen evaluate) is valid and fit; always so with "
                                                          "CXR_REQUIRE_EVALUATION=true."),
                  as_json: bool = AS_JSON) -> None:
    """Make a version production, after checking its bundle (and its site evaluation, when required);
    recorded with who and why."""
    from store import evaluations, registry

    _warn_unsigned(model_store)
    with _clean_errors():
        if require_evaluation or evaluations.evaluation_required():
            evaluations.require_passing(model_store, registry.load_card(model_store, version),
                                        "--require-evaluation is given" if require_evaluation
                                        else f"{evaluations.REQUIRE_VARIABLE} is set")
        card = registry.load_card(model_store, version)
        seen = registry.read_production(model_store)
        if seen.problem:  # a pointer that cannot be followed is what promotion replaces: said, not silent
            errors.print(f"[yellow]warning:[/yellow] {escape(seen.problem)} (replaced now)")
        entry = registry.set_production(model_store, version, reason, by=by, expected=seen)
    if _fit(card) is False:  # a person may overrule training's verdict; the record says they did
        errors.print(f"[yellow]warning:[/yellow] {version} was found not fit for screening in training: "
                     f"{escape(str(card.validity['fitness'].get('line', '')))}")
    _report_change(entry, version, as_json)


@models_app.command("rollback")
def rollback_model(reason: str = REASON, by: str | None = BY, model_store: str = STORE,
                   as_json: bool = AS_JSON) -> None:
    """Make the previous production version production again (twice: two steps back)."""
    from store import registry

    _warn_unsigned(model_store)
    with _clean_errors():
        entry = registry.rollback(model_store, reason, by=by)
    _report_change(entry, entry["version"], as_json)


def _report_change(entry: dict | None, version: str, as_json: bool) -> None:
    if as_json:
        _print_json({"changed": entry is not None, "version": version, **(entry or {})})
    elif entry is None:
        console.print(f"{version} is production already: nothing changed.")
    else:
        console.print(f"[bold]{entry['version']}[/bold] is production now (was {entry['previous'] or 'none'}); "
                      f"recorded: {entry['action']} by {escape(entry['by'])} at {entry['at']}: "
                      f"{escape(entry['reason'])}")


def _summaries(store: str):
    """production.json as read, and one row per version, oldest first. A card that cannot be read
    or used is a row of its own (status unusable, ``problem`` naming its file), never the end of
    the listing."""
    from store import registry, storage

    production = registry.read_production(store)
    cards, rows = {}, []
    for version in registry.list_versions(store):
        try:
            cards[version] = registry.load_card(store, version)
        except (ValueError, storage.StorageError) as error:  # BundleError, StoredStateError, an unreadable file
            rows.append(_unusable(version, str(error)))
    current = cards.get(production.version) if production.version else None
    for version, card in cards.items():
        try:
            rows.append(_row(card, production, current))
        except (ValueError, TypeError, KeyError, AttributeError) as error:  # the schema checks what screening uses
            uri = storage.join(store, version, registry.CARD)
            rows.append(_unusable(version, f"{uri}: cannot be listed ({type(error).__name__}: {error})"))
    return production, sorted(rows, key=lambda row: row["version"])


def _unusable(version: str, problem: str) -> dict:
    return {"version": version, "created_at": "", "status": "unusable", "auc": None, "sensitivity": None,
            "specificity": None, "threshold": None, "warnings": [], "fit": None, "decision": None,
            "problem": " ".join(problem.split())}  # one line


def _row(card, production, current) -> dict:
    positive = _positive(card)
    return {"version": card.version, "created_at": card.created_at, "status": _status(card, production, current),
            "auc": positive.get("auc"), "sensitivity": positive.get("sensitivity_at_threshold"),
            "specificity": positive.get("specificity_at_threshold"), "threshold": card.threshold,
            "warnings": card.shortcut_warnings, "fit": _fit(card), "decision": card.promotion.get("reason"),
            "problem": None}


def _positive(card) -> dict:
    """The card's positive-class test metrics (empty when the card holds none, or something else)."""
    positive = card.metrics.get("positive")
    return positive if isinstance(positive, dict) else {}


def _warn_unsigned(store: str) -> str | None:
    """Says on stderr that the store is unsigned, when it is; returns the warning."""
    from store.registry import unsigned_warning

    warning = unsigned_warning(store)
    if warning:
        errors.print(f"[bold red]warning:[/bold red] {escape(warning)}")
    return warning


def _fit(card) -> bool | None:
    """The acceptance verdict training recorded (None for cards from before acceptance criteria)."""
    fitness = card.validity.get("fitness")
    return bool(fitness.get("fit")) if isinstance(fitness, dict) and "fit" in fitness else None


def _card_or_none(store: str, version: str | None):
    from model.bundle import BundleError
    from store import registry

    if version is None:
        return None
    try:
        return registry.load_card(store, version)
    except BundleError:
        return None


def _status(card, production, current) -> str:
    """production; previous (what rollback restores); retired (production once); candidate (never
    production, and awaiting approval or recommended by its training after the current production
    was made); candidate (not fit) (below the acceptance criteria: only a person may promote it);
    not promoted (its training decided against it)."""
    lineage = production.lineage()
    if card.version == production.version:
        return "production"
    if len(lineage) > 1 and card.version == lineage[-2]:
        return "previous"
    if card.version in lineage or any(card.version == entry.get("previous") for entry in production.history):
        return "retired"
    if _fit(card) is False:
        return "candidate (not fit)"
    if card.promotion.get("require_approval"):
        return "candidate"
    if card.promotion.get("promoted"):  # training's choice, yet not production: it lost a race, or is old
        newer = current is None or (card.created_at or "") > (current.created_at or "")
        return "candidate" if newer else "retired"
    return "not promoted"


def _styled(status: str) -> str:
    colour = {"production": "green", "candidate": "cyan", "unusable": "red"}.get(status)
    return f"[{colour}]{status}[/{colour}]" if colour else status


def _shown(value) -> str:
    """A figure to three places; n/a for None; anything else (a damaged card's) as escaped text."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f}"
    return escape(repr(value)[:40])


def _print_json(value: dict) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@contextlib.contextmanager
def _clean_errors():
    """Known failures end with one line: 3 for what the input or configuration must fix, 1 otherwise."""
    from store.storage import AccessDenied, NotAFolder, NotFound, StorageError

    try:
        yield
    except (ValueError, NotFound, AccessDenied, NotAFolder) as error:  # BundleError, LocationError, conflicts
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=3) from None
    except StorageError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=1) from None
