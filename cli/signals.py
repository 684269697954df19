"""A stop signal is never lost to a destructor.

Python runs a signal's handler between any two bytecodes, a destructor's (``__del__``) among them,
and an exception raised there is printed ("Exception ignored in ...") and dropped. Prefect's SIGTERM
handler raises ``TerminationSignal``: when it lands in, say, an asyncio transport's ``__del__``, the
SIGTERM is ignored and the command goes on, its temporary server with it (seen in
tests/test_leftovers.py). The hook installed here sends such a signal to the process again, so that
its handler runs once more, outside the destructor.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["resend_signals_lost_in_destructors"]

_RESEND_AFTER_SECONDS = 0.01  # from another thread: the handler then runs wherever the main thread is next


def resend_signals_lost_in_destructors() -> None:
    """Chain a ``sys.unraisablehook`` that, after the usual report, sends again the signal whose
    exception (``KeyboardInterrupt``, Prefect's ``TerminationSignal``) a destructor swallowed. Once
    per process."""
    previous = sys.unraisablehook
    if getattr(previous, "resends_signals", False):
        return

    def hook(unraisable) -> None:
        previous(unraisable)
        signum = _signal_of(unraisable.exc_value)
        if signum is not None:
            resend = threading.Timer(_RESEND_AFTER_SECONDS, os.kill, (os.getpid(), signum))
            resend.daemon = True
            resend.start()

    hook.resends_signals = True
    sys.unraisablehook = hook


def _signal_of(error: BaseException | None) -> int | None:
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    # Prefect's, named rather than imported: this runs before Prefect loads, and must not load it.
    number = getattr(error, "signal", None)
    if type(error).__name__ == "TerminationSignal" and number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        return int(number)
    return None
