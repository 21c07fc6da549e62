"""Failures the trainer classifies, and the termination message the operator reads."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kubetune.api.contract import (
    ENV_CACHE_DIR,
    ENV_TERMINATION_LOG,
    TERMINATION_LOG,
    ExitCode,
    ProgressReport,
    TerminationMessage,
)
from kubetune.api.models import Artifacts, EvaluationResult


class TrainerError(Exception):
    """An error with an exit code from the contract and a message that says what to fix."""

    def __init__(self, exit_code: ExitCode, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def write_termination_message(
    exit_code: int,
    message: str,
    progress: ProgressReport | None = None,
    artifacts: Artifacts | None = None,
    evaluation: EvaluationResult | None = None,
) -> None:
    """Kubernetes shows TERMINATION_LOG in the pod status; $KUBETUNE_TERMINATION_LOG wins when set.

    `progress` is rank 0's final report: the operator's last poll may be a step behind; `artifacts` what
    it published beyond the fixed layout (the OCI reference); `evaluation` its verdict on the final model
    (status.evaluation), passed or failed.
    """
    text = TerminationMessage.build(exit_code, message, progress, artifacts, evaluation).to_text()
    for target in (os.environ.get(ENV_TERMINATION_LOG), TERMINATION_LOG):
        if not target:
            continue
        path = Path(target)
        if target == TERMINATION_LOG and not path.exists():
            continue  # not in a pod
        try:
            earlier = TerminationMessage.read(path)
            if exit_code == ExitCode.INFRASTRUCTURE and earlier is not None and earlier.exit_code != 0:
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
