"""The entry points: the ``cxr-screen`` command line, the deploy script, and what a Prefect worker runs.

Process-wide settings are made in one place, ``bootstrap()``, which every entry point (the command
line, ``python -m cli.deploy``, deployments' flow runs, the benches, the tests) calls before
TensorFlow or Prefect is imported. Importing ``model``, ``tasks`` or ``flows`` changes nothing.
"""

from __future__ import annotations

import os

__all__ = ["bootstrap"]

# Read by TensorFlow and Prefect when they are imported or start their servers.
_PROCESS_DEFAULTS = {
    # TensorFlow picks its oneDNN default from the CPU. Where it leaves the kernels off (an AVX2 AMD
    # EPYC, for one), turning them on makes VGG16's batched forward pass about 15% faster
    # (bench/screen_bench.py).
    "TF_ENABLE_ONEDNN_OPTS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",  # quiet start-up
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry
    # A first start migrates a new database: on a busy 2-core machine that takes more than the default 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def bootstrap(settings_file: bool = True) -> None:
    """Set this process' options once; an explicit value from the user always wins.

    With ``settings_file``, the ``CXR_*`` values of the deployments' settings file (``cxr.env``, or
    the file ``CXR_SETTINGS`` names) become defaults, so the command line and the deployments
    share one vocabulary and one file. Raises SystemExit when ``CXR_SETTINGS`` names no file, or
    when the file sets a variable that says where code comes from or runs (``CXR_PROJECT_DIR``,
    ``CXR_DASK_ADDRESS``, ``CXR_STACK_DIR``: ``deployments/environment_only.py``), which only the
    real environment may set.
    """
    for key, value in _PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if settings_file:
        _load_settings_file()
    if os.environ.get("PREFECT_HOME"):  # Prefect does not create it, and its database cannot open without it
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
    from cli.failure_logs import quiet_expected_failures
    from cli.signals import resend_signals_lost_in_destructors

    quiet_expected_failures()
    resend_signals_lost_in_destructors()


def _load_settings_file() -> None:
    from dotenv import dotenv_values

    path = os.environ.get("CXR_SETTINGS", "cxr.env")
    if "CXR_SETTINGS" in os.environ and not os.path.isfile(path):
        raise SystemExit(f"error: CXR_SETTINGS names {path}, which is not a file")
    from deployments.environment_only import refusal

    values = dotenv_values(path) if os.path.isfile(path) else {}
    refused = refusal(path, values)
    if refused:
        raise SystemExit(f"error: {refused}")
    for key, value in values.items():
        if key.startswith("CXR_") and value is not None:
            os.environ.setdefault(key, value)
