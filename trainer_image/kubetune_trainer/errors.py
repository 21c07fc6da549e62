"""Failures the trainer classifies, and the termination message the operator reads."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from kubetune.api.contract import ENV_CACHE_DIR, ENV_TERMINATION_LOG, REASONS, ExitCode


class TrainerError(Exception):
    """An error with an exit code from the contract and a message that says what to fix."""

    def __init__(self, exit_code: ExitCode, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def termination_message(exit_code: int, message: str, progress: dict[str, Any] | None = None) -> dict[str, object]:
    """The JSON the operator reads. Kubernetes keeps at most 4096 bytes of it, so the message is cut."""
    out: dict[str, object] = {
        "exitCode": int(exit_code),
        "reason": REASONS.get(exit_code, "Succeeded" if exit_code == 0 else "Error"),
        "message": message[-2500:],
    }
    if progress:
        out["progress"] = {k: v for k, v in progress.items() if v is not None}
    return out


def _holds_error(path: Path) -> bool:
    try:
        return int(json.loads(path.read_text())["exitCode"]) != 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_termination_message(exit_code: int, message: str, progress: dict[str, Any] | None = None) -> None:
    """Kubernetes shows /dev/termination-log in the pod status; $KUBETUNE_TERMINATION_LOG wins when set.

    `progress` is rank 0's final /progress snapshot: the operator's last poll may be a step behind.
    """
    text = json.dumps(termination_message(exit_code, message, progress))
    targets = [os.environ.get(ENV_TERMINATION_LOG), "/dev/termination-log"]
    for target in targets:
        if not target:
            continue
        path = Path(target)
        if target == "/dev/termination-log" and not path.exists():
            continue
        try:
            if exit_code == ExitCode.INFRASTRUCTURE and _holds_error(path):
                return  # a rank's own error came first; peers that lost it only add noise
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        except OSError:
            continue


# A full or read-only disk, or a quota: a restart on the same volume cannot help.
USER_OS_ERRORS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EROFS: "is read-only"}


def user_os_error(exc: OSError) -> TrainerError | None:
    """OSErrors a restart cannot fix, as user errors naming the path; None for the rest (infrastructure)."""
    what = USER_OS_ERRORS.get(exc.errno or 0)
    if what is None:
        return None
    where = exc.filename or "the output or cache volume"
    return TrainerError(
        ExitCode.CONFIG_INVALID,
        f"writing {where}: the volume {what} ({exc.strerror}); free space or choose another spec.output.uri "
        f"(checkpoints are staged under {os.environ.get(ENV_CACHE_DIR, 'the cache directory')} first)",
    )
