"""metav1.Condition bookkeeping: reasons are CamelCase constants, each with its message."""

from __future__ import annotations

from typing import Any, Final

# Condition types
SPEC_VALID: Final = "SpecValid"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"

# Reason -> message template (formatted with the keyword arguments given to `reason_message`).
MESSAGES: Final[dict[str, str]] = {
    "SpecAccepted": "The spec is valid.",
    "SpecInvalid": "The spec was refused: {problems}",
    "PodsPending": "Waiting for {nodes} pod(s) to be scheduled ({pending} pending).",
    "PodsStarting": "Pods are starting; the trainer is loading the model and data.",
    "TrainingRunning": "Training: step {step} of {total} ({percent}%).",
    "TrainingStarted": "All {nodes} pod(s) are running.",
    "GangRestarting": "Rank failed ({cause}); restarting the whole gang from the last checkpoint (restart {restart} of {limit}).",
    "JobSuspended": "Suspended: no pods run until spec.runPolicy.suspend is false (or a queue admits the job).",
    "JobResumed": "Resumed.",
    "TrainingSucceeded": "Training finished; artifacts are under {uri}.",
    "BackoffLimitExceeded": "Failed after {restarts} restart(s); last failure: {cause}.",
    "DeadlineExceeded": "Ran longer than spec.runPolicy.activeDeadlineSeconds ({seconds}s).",
}


def reason_message(reason: str, **kwargs: Any) -> str:
    template = MESSAGES.get(reason, "{cause}")
    try:
        return template.format(**kwargs)
    except (KeyError, IndexError):
        return template


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else now
    new: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    out.append(new)
    order = [SPEC_VALID, RUNNING, SUSPENDED, SUCCEEDED, FAILED]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
