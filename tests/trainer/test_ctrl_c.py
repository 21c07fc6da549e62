"""Ctrl-C as a terminal sends it: `kubetune run` under a real pseudo-terminal, ^C written to the pty.

The terminal driver turns ^C into SIGINT for the whole foreground process group. The README
promises: the ranks checkpoint at the next step, kubetune exits 130 saying where the checkpoint
is, and the same command resumes from it. A second ^C stops at once, keeping the last complete
checkpoint.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainer_helpers import free_port, job_spec, termination, write_config


def manifest(tmp: Path) -> Path:
    spec = job_spec(
        tmp, **{"training.maxSteps": 400, "training.loggingSteps": 2, "output.checkpointSteps": 1000}
    )
    spec["dataset"].pop("eval")
    path = tmp / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "ctrl-c"},
                "spec": spec,
            }
        )
    )
    return path


class Terminal:
    """A child process whose controlling terminal is a pty we hold the other side of."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its own session, the pty as its terminal, in the foreground group
            os.execve(argv[0], argv, env if env is not None else dict(os.environ))
        self.text = ""

    def read_until(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(pattern, self.text)
            if match:
                return match
            if not self._read(deadline - time.time()):
                break
        raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.text[-3000:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.text += chunk.decode(errors="replace")
        return bool(chunk)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while select.select([self.fd], [], [], 0.2)[0] and self._read(0):
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.2)
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout}s:\n{self.text[-3000:]}")


def complete_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "kubetune.cli.main", "run", str(manifest(tmp_path)), "--output", str(out)]

    first = Terminal(argv)
    first.read_until(r"step (1\d|[2-9]\d)/400", timeout=240)
    first.ctrl_c()
    rc = first.wait(timeout=120)
    assert rc == 130, first.text[-3000:]
    [kept] = complete_checkpoints(out)
    assert re.search(
        rf"stopped by SIGINT; checkpoint in {re.escape(str(out))}/checkpoints/{kept}; resume with: kubetune run ",
        first.text,
    )
    assert "Traceback" not in first.text and "KeyboardInterrupt" not in first.text
    step = int(kept.removeprefix("step-"))
    assert step >= 10

    second = Terminal(argv)  # the same command: resumes, then two ^C stop it at once
    second.read_until(rf"resumed from checkpoint step {step}\b", timeout=240)
    second.read_until(rf"step ({step + 1}|{step + 2})/400", timeout=120)
    second.ctrl_c()
    second.read_until("checkpointing at the next step", timeout=30)
    second.ctrl_c()
    started = time.time()
    assert second.wait(timeout=60) == 130
    assert time.time() - started < 30
    assert complete_checkpoints(out)[0] == kept  # the last complete checkpoint is kept
    assert "Traceback" not in second.text

    newest = int(complete_checkpoints(out)[-1].removeprefix("step-"))
    # the same command resumes (a changed config would be refused: honest resume)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from checkpoint step {newest}" in done.stderr
    assert (out / "COMPLETE").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "hangup"])
def test_a_rank_checkpoints_on_sigint_and_sighup(tmp_path: Path, how: str) -> None:
    """The trainer itself (as torchrun or a pod runs it) treats SIGINT and SIGHUP like SIGTERM."""
    spec = job_spec(
        tmp_path, **{"training.maxSteps": 400, "training.loggingSteps": 2, "output.checkpointSteps": 1000}
    )
    spec["dataset"].pop("eval")
    spec["distributed"]["procsPerNode"] = 1
    env = {
        **os.environ,
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),  # and what torchrun sets for a rank:
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    rank = Terminal(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(write_config(tmp_path, spec))], env
    )
    rank.read_until(r"step \d+/400", timeout=240)
    if how == "ctrl-c":
        rank.ctrl_c()
    else:
        os.kill(rank.pid, signal.SIGHUP)
    assert rank.wait(timeout=120) == 143, rank.text[-3000:]
    [kept] = complete_checkpoints(tmp_path / "out")
    name = "SIGINT" if how == "ctrl-c" else "SIGHUP"
    assert f"{name}: checkpoint written at step {int(kept.removeprefix('step-'))}" in rank.text
    assert termination(tmp_path)["exitCode"] == 143
    assert "Traceback" not in rank.text and "KeyboardInterrupt" not in rank.text
