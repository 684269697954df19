"""The settings that say where code comes from or runs, read only from the real environment.

A settings file (``cxr.env`` in the working folder, or the file ``CXR_SETTINGS`` names) is data
whoever can write that folder controls. Where results go is fine to take from it; which code the
workers run is not. A file that names one of these is refused, one line naming the file and the
variable, both by ``cli.bootstrap`` (which turns the file into defaults for the command line) and by
``deployments.settings.Settings`` (which reads it for the deployments).

Imports nothing: ``cli.bootstrap`` reads it before anything else loads.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ENVIRONMENT_ONLY", "refusal"]

ENVIRONMENT_ONLY = {
    "CXR_PROJECT_DIR": "it names the code the process workers run",
    "CXR_DASK_ADDRESS": "it names the Dask cluster that runs screening's chunks, whose answers the flow unpickles",
    "CXR_STACK_DIR": "it names the local stack whose processes 'stack down' stops and whose data "
                     "'stack down --wipe' removes",
}


def refusal(source: str, keys: Iterable[str]) -> str | None:
    """One line refusing the file ``source`` when ``keys`` (its variable names, any case) name a
    setting of ``ENVIRONMENT_ONLY``; None when they name none."""
    named = sorted({key.upper() for key in keys} & ENVIRONMENT_ONLY.keys())
    if not named:
        return None
    name = named[0]
    others = f" (and {', '.join(named[1:])})" if named[1:] else ""
    return (f"{source} sets {name}{others}, which is read only from the environment: {ENVIRONMENT_ONLY[name]}. "
            f"Remove it from the file; export it in the environment if you mean it")
