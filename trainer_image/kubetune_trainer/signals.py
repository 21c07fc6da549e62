"""SIGTERM, SIGINT (Ctrl-C) and SIGHUP (terminal closed) all mean the same to a rank: checkpoint at the
next step boundary (every rank agrees on the step), then exit 143 so a restart resumes.

Before training can checkpoint (imports, model and data loading) a signal stops the rank at once:
there is nothing new to keep, and the last complete checkpoint stays as it is.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StoppedBeforeTraining(BaseException):
    """A stop signal arrived before the step loop could checkpoint (a BaseException, like KeyboardInterrupt,
    so that no library's `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)} before training started; no new checkpoint")
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise(signum: int, _frame: Any) -> None:
    raise StoppedBeforeTraining(signum)


def stop_at_once() -> None:
    """Until the step loop runs: a stop signal ends the rank (no KeyboardInterrupt traceback)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise)


def stop_at_next_step(handler: Callable[[int, Any], None]) -> None:
    """From setup on: a stop signal only sets the flag the step loop reads once per optimizer step."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
