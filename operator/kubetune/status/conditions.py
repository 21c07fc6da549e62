"""metav1.Condition bookkeeping: reasons are CamelCase constants, each with its message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from kubetune.api.models import Condition

# Condition types
SPEC_VALID: Final = "SpecValid"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SERVING: Final = "Serving"
EVALUATED: Final = "Evaluated"  # spec.evaluation: the final model's figures and its gate
ORDER: Final = (SPEC_VALID, RUNNING, SUSPENDED, EVALUATED, SUCCEEDED, FAILED, SERVING)
"""The order conditions are listed in."""

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
    "ServingCreated": "{kind} {name} created; it serves {uri}.",
    "ServingAPIMissing": "The cluster has no {kind} API ({api}): install KServe's CRDs, or set spec.serving.kind: Deployment. The model stays at {uri}.",
    "ServingRefused": "The API server refused {kind} {name}: {error}",
    "ServingNameTaken": "{kind} {name} already exists and this FineTuneJob does not own it (left alone): set spec.serving.name to another name.",
    "Evaluated": "Evaluated: {figures}.",
    "EvaluationPassed": "Evaluation gate passed: {figures}.",
    "EvaluationGateFailed": "Evaluation gate failed; nothing published, artifacts kept for inspection: {figures}.",
}


def reason_message(reason: str, **kwargs: Any) -> str:
    template = MESSAGES.get(reason, "{cause}")
    try:
        return template.format(**kwargs)
    except (KeyError, IndexError):
        return template


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime moves only when the status flips."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = get_condition(conditions, type_)
    since = old.last_transition_time if old is not None and old.status == value and old.last_transition_time else now
    new = Condition(
        type=type_, status=value, reason=reason, message=message, last_transition_time=since, observed_generation=generation
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: ORDER.index(c.type) if c.type in ORDER else len(ORDER))


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
