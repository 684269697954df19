"""A command's options generated from its flow's parameters model (flows/parameters.py).

Each field becomes a typer parameter with the field's default and its description as help; the
field's type, bounds and cross-field rules are checked once, by pydantic, when the parameters are
built. Only what the user gave (on the command line or through an environment variable) is passed
to the model, so the model's defaults are the only ones, and ``params.model_fields_set`` tells
given from defaulted.

The rule, and what ``OptionSpec`` changes for one field:

- ``name_uri`` fields (locations) are ``--name``; every other field ``name_x`` is ``--name-x``;
- a boolean off by default is a flag (``--multiclass``), one on by default a pair
  (``--calibrate/--no-calibrate``), so that it can be turned off;
- a ``Literal`` is taken as its values' type (pydantic names the allowed values when it refuses one);
- a list is a repeated option (``--where A=1 --where B=2``), or with ``comma_separated`` one option
  split at commas;
- a bad value ends the command before anything starts: one line naming the option, exit code 2.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ValidationError
from rich.markup import escape

from cli.exits import EXIT_USAGE
from cli.output import console

__all__ = ["OptionSpec", "parameters_command"]


@dataclass(frozen=True)
class OptionSpec:
    """How one field appears on the command line, where it differs from the rule."""

    name: str | None = None  # the option, e.g. "--class" for synthetic_class
    flags: str | None = None  # a boolean's declaration, e.g. "--deidentify/--no-deidentify"
    envvar: str | None = None  # also read from this environment variable (and the settings file, cxr.env)
    comma_separated: str | None = None  # a list given as one option, e.g. "COL[,COL]", shown before the help


def parameters_command(model: type[BaseModel], *, arguments: Sequence[str] = (), fields: Sequence[str] | None = None,
                       specs: dict[str, OptionSpec] | None = None) -> Callable:
    """Decorates ``body(params, **cli_only)``: the command typer registers takes the model's fields
    (``arguments`` positional, the rest options; ``fields``: only these, in this order, the others
    keep their defaults) followed by ``body``'s own command-line-only parameters (``--json``), and
    calls ``body`` with the validated parameters."""
    specs = specs or {}
    unknown = (set(specs) | set(arguments) | set(fields or ())) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no field {sorted(unknown)}")
    chosen = list(fields if fields is not None else model.model_fields)
    generated = {name: _parameter(model, name, name in arguments, specs.get(name, OptionSpec())) for name in chosen}

    def decorate(body: Callable) -> Callable:
        own = [_resolved(parameter, body.__globals__)  # after params
               for parameter in list(inspect.signature(body).parameters.values())[1:]]
        names = {name: _display(parameter.default) for name, parameter in generated.items()}

        @functools.wraps(body)
        def command(*, _context: typer.Context, **values):
            sources = {name: getattr(_context.get_parameter_source(name), "name", "DEFAULT") for name in generated}
            given = {name: _from_cli(values[name], specs.get(name)) for name, source in sources.items()
                     if source != "DEFAULT"}
            shown = {name: f"{option} (from {specs[name].envvar})" if sources[name] == "ENVIRONMENT" else option
                     for name, option in names.items()}
            params = _validated(model, shown, given)
            return body(params, **{parameter.name: values[parameter.name] for parameter in own})

        context = inspect.Parameter("_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        command.__signature__ = inspect.Signature([context, *generated.values(), *own])
        command.__annotations__ = {}  # typer reads the types from the signature
        del command.__wrapped__  # and nothing from body's
        command.parameters_model = model
        return command

    return decorate


def _parameter(model: type[BaseModel], name: str, argument: bool, spec: OptionSpec) -> inspect.Parameter:
    field = model.model_fields[name]
    kind = _cli_type(field.annotation)
    if field.is_required():
        default = ...
    elif field.default_factory is not None:
        default = None  # given or not, the model makes its own
    else:
        default = field.default
    help_text = field.description or ""
    if argument:
        info = typer.Argument(default, help=help_text)
    else:
        if spec.comma_separated:
            kind, help_text = str | None, f"{spec.comma_separated}: {help_text}"
        elif typing.get_origin(kind) is list:
            kind = kind | None
        info = typer.Option(default, _declaration(name, kind, default, spec), help=help_text, envvar=spec.envvar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _declaration(name: str, kind, default, spec: OptionSpec) -> str:
    if spec.flags:
        return spec.flags
    option = spec.name or "--" + name.removesuffix("_uri").replace("_", "-")
    if kind is bool and default is True:
        return f"{option}/--no-{option.removeprefix('--')}"
    return option


def _resolved(parameter: inspect.Parameter, namespace: dict) -> inspect.Parameter:
    """A command-line-only parameter, its annotation evaluated (under ``from __future__ import annotations``)."""
    if isinstance(parameter.annotation, str):
        parameter = parameter.replace(annotation=eval(parameter.annotation, namespace))  # noqa: S307 - as inspect does
    return parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)


def _cli_type(annotation):
    """The type typer parses: a Literal's values' type, constraints left to pydantic."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return type(args[0])
    if origin is Annotated:
        return _cli_type(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [_cli_type(arg) for arg in args if arg is not type(None)]
        if len(kinds) == 1 and len(args) == 2:
            return kinds[0] | None
        raise TypeError(f"no command-line type for {annotation}")
    if origin is list:
        return list[_cli_type(args[0])]
    return annotation


def _from_cli(value, spec: OptionSpec | None):
    if spec and spec.comma_separated and value is not None:
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, tuple):
        return list(value)
    return value


def _display(info) -> str | None:
    """The option as the user types it ("--model-store"); None for an argument."""
    if isinstance(info, typer.models.ArgumentInfo):
        return None
    return info.param_decls[0].split("/")[0]


def _validated(model: type[BaseModel], names: dict[str, str | None], values: dict):
    """The flow's parameters, checked before Prefect starts: a bad value ends with one line, exit 2."""
    try:
        return model(**values)
    except ValidationError as error:
        for problem in error.errors():
            if problem["loc"]:
                field = str(problem["loc"][0])
                option = names.get(field) or field.upper()
                console.print(f"[red]error:[/red] {option}: {escape(problem['msg'])} "
                              f"(got {escape(repr(problem.get('input')))})")
            else:  # a rule across options
                console.print(f"[red]error:[/red] {escape(problem['msg'].removeprefix('Value error, '))}")
        raise typer.Exit(code=EXIT_USAGE) from None
