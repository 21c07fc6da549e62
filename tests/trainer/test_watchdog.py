"""The hang watchdog: a rank without an optimizer step for progressDeadlineSeconds reports every thread's stack
and ends with ExitCode.STALLED (a retryable failure the operator restarts from the last checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

from kubetune.api import contract
from kubetune_trainer.debug import DebugHooks
from kubetune_trainer.watchdog import Watchdog, stacks


def test_no_report_while_steps_come_in_time():
    now = [0.0]
    reports: list[str] = []
    dog = Watchdog(10, reports.append, clock=lambda: now[0])
    for step in range(1, 6):
        now[0] += 9
        dog.beat(step)
        assert not dog.check()
    assert reports == []


def test_a_rank_without_a_step_past_the_deadline_reports_its_stacks():
    now = [0.0]
    reports: list[str] = []
    dog = Watchdog(10, reports.append, clock=lambda: now[0])
    dog.beat(7)
    now[0] = 11
    assert dog.check()
    assert reports == ["no optimizer step for 11s after step 7 (progressDeadlineSeconds 10)"]


def test_the_hang_hook_stops_only_the_rank_and_step_asked_for(monkeypatch):
    monkeypatch.setenv("KUBETUNE_DEBUG_HANG_AT_STEP", "6")
    monkeypatch.setenv("KUBETUNE_DEBUG_HANG_RANK", "1")
    hooks = DebugHooks.from_env()
    assert hooks.hangs_at(6, 1)
    assert not hooks.hangs_at(6, 0) and not hooks.hangs_at(5, 1) and not hooks.hangs_at(7, 1)
    hooks.hang_if_asked(6, 0)  # returns at once on every other rank
    assert not DebugHooks().hangs_at(0, 0)  # unset: nobody hangs


def test_stacks_show_where_each_other_thread_waits():
    gate = threading.Event()

    def stuck_in_a_collective() -> None:
        gate.wait(10)

    t = threading.Thread(target=stuck_in_a_collective, name="rank-main")
    t.start()
    try:
        text = stacks()
    finally:
        gate.set()
        t.join()
    assert "Thread rank-main" in text and "stuck_in_a_collective" in text


def test_a_stuck_process_exits_stalled_with_its_stacks_in_the_termination_message(tmp_path):
    log = tmp_path / "termination-log"
    script = textwrap.dedent("""
        import time
        from kubetune_trainer.watchdog import Watchdog, exit_stalled
        Watchdog(0.3, exit_stalled).start()
        def waiting_for_a_peer():
            time.sleep(30)
        waiting_for_a_peer()
    """)
    env = {"KUBETUNE_TERMINATION_LOG": str(log), "PYTHONPATH": ":".join(sys.path)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == contract.ExitCode.STALLED, r.stderr
    assert "STALLED" in r.stderr and "waiting_for_a_peer" in r.stderr
    msg = json.loads(log.read_text())
    assert msg["reason"] == "Stalled" and "no optimizer step" in msg["message"]
    assert (
        "main thread, innermost first: <string>:6 waiting_for_a_peer < <string>:7 <module>" in msg["message"]
    )
    assert contract.is_retryable(msg["exitCode"])
