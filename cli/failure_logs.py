"""One line, not a traceback, for the failures this project explains itself.

Prefect logs every failed task and flow run with its traceback. The errors this project raises (a
missing folder, an unsupported scheme, no production model, a chunk runner that cannot start...)
are written for the person reading them, and forty lines of frames only bury that line. Any other
exception is a bug, and keeps its traceback.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_expected_failures"]

_OURS = {"cli", "flows", "tasks", "imaging", "screening", "store", "templates", "model", "deployments"}


class _OneLineForOurErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__module__.split(".")[0] in _OURS:
            record.exc_info = record.exc_text = None
        return True


def quiet_expected_failures() -> None:
    """Installs the filter on Prefect's flow- and task-run loggers (once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _OneLineForOurErrors) for existing in logger.filters):
            logger.addFilter(_OneLineForOurErrors())
