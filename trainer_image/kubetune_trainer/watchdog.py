"""Hang watchdog: a rank that makes no optimizer step for spec.runPolicy.progressDeadlineSeconds writes every
thread's Python stack to its log and to its termination message, then exits with ExitCode.STALLED.

A rank stuck in a collective (a peer that died or hangs) ignores SIGTERM until the grace period kills it and
leaves no trace. This thread still runs while the main thread waits in C code, so the operator sees why
(`status.lastFailure`) and restarts the gang from the last checkpoint, counted against backoffLimit. The
stacks come from the process itself (sys._current_frames): py-spy would need CAP_SYS_PTRACE, which the
non-root trainer pods do not have.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

from kubetune.api.contract import ExitCode


def stacks() -> str:
    """Every other thread's Python stack, innermost call last (like py-spy dump); the main thread last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    frames = sorted(sys._current_frames().items(), key=lambda item: item[0] == main)
    out = []
    for ident, frame in frames:
        if ident == threading.get_ident():
            continue
        out.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def main_stack_brief(limit: int = 12) -> str:
    """The main thread's stack on one line, innermost call first: `file:line function < caller < ...`."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "?"
    calls = [
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
        for f in reversed(traceback.extract_stack(frame))
    ]
    return " < ".join(calls[:limit])


class Watchdog:
    """`beat()` after each optimizer step; `seconds` without one calls `on_stall(report)` once."""

    def __init__(
        self, seconds: float, on_stall: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds, self.on_stall, self.clock = seconds, on_stall, clock
        self.last = clock()
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubetune-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.last, self.step = self.clock(), step

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """True (after calling on_stall) when the deadline passed."""
        idle = self.clock() - self.last
        if idle < self.seconds:
            return False
        self.on_stall(
            f"no optimizer step for {idle:.0f}s after step {self.step} (progressDeadlineSeconds {self.seconds:g})"
        )
        return True

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.seconds / 4)):
            if self.check():
                return


def exit_stalled(summary: str) -> None:
    """Log every stack, leave the main thread's as the termination message, and end the process now (its
    main thread is stuck, so nothing else would)."""
    from kubetune_trainer.errors import write_termination_message

    print(f"[kubetune] STALLED: {summary}; Python stacks:\n{stacks()}", file=sys.stderr, flush=True)
    write_termination_message(
        ExitCode.STALLED, f"{summary}; main thread, innermost first: {main_stack_brief()}"
    )
    os._exit(int(ExitCode.STALLED))
