"""metav1.Condition bookkeeping: reasons are CamelCase constants, each with its message."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, Final, Literal

from kubetune.api.contract import REASONS, ExitCode
from kubetune.api.models import Condition

# Condition types
SPEC_VALID: Final = "SpecValid"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SERVING: Final = "Serving"
EVALUATED: Final = "Evaluated"  # spec.evaluation: the final model's figures and its gate
ADMITTED: Final = "Admitted"  # a job in a Kueue queue: whether Kueue has admitted its gang
GANG_READY: Final = "PodGroupReady"  # spec.scheduling.gang: the gang scheduler's PodGroup exists
ORDER: Final = (SPEC_VALID, ADMITTED, GANG_READY, RUNNING, SUSPENDED, EVALUATED, SUCCEEDED, FAILED, SERVING)
"""The order conditions are listed in."""


class Reason(str, Enum):
    """The reasons the operator itself gives in conditions and Events: CamelCase, each with one message template
    in MESSAGES. (A failed rank's reason is the trainer's (kubetune.api.contract.REASONS) or Kubernetes', with the
    rank's own message.)"""

    SPEC_ACCEPTED = "SpecAccepted"
    SPEC_INVALID = "SpecInvalid"
    PODS_PENDING = "PodsPending"
    PODS_STARTING = "PodsStarting"
    UNSCHEDULABLE = "Unschedulable"
    TRAINING_RUNNING = "TrainingRunning"
    TRAINING_STARTED = "TrainingStarted"
    GANG_RESTARTING = "GangRestarting"
    GANG_SHRINKING = "GangShrinking"
    NODE_LOST = "NodeLost"
    JOB_SUSPENDED = "JobSuspended"
    JOB_RESUMED = "JobResumed"
    QUEUED_BY_KUEUE = "QueuedByKueue"
    ADMITTED_BY_KUEUE = "AdmittedByKueue"
    EVICTED_BY_KUEUE = "EvictedByKueue"
    POD_GROUP_CREATED = "PodGroupCreated"
    POD_GROUP_CRD_MISSING = "PodGroupCRDMissing"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    NEW_RUN = "NewRun"
    OUTPUT_IN_USE = "OutputInUse"
    SERVING_CREATED = "ServingCreated"
    SERVING_API_MISSING = "ServingAPIMissing"
    SERVING_REFUSED = "ServingRefused"
    SERVING_NAME_TAKEN = "ServingNameTaken"
    CHECKPOINT_REQUESTED = "CheckpointRequested"
    CHECKPOINT_WRITTEN = "CheckpointWritten"
    CHECKPOINT_NOT_CONFIRMED = "CheckpointNotConfirmed"
    EVALUATED = "Evaluated"
    EVALUATION_PASSED = "EvaluationPassed"
    EVALUATION_GATE_FAILED = REASONS[
        ExitCode.EVALUATION_GATE_FAILED
    ]  # the condition names the trainer's exit reason
    NETWORK_UNREACHABLE = REASONS[ExitCode.NETWORK_UNREACHABLE]  # a rank's network check: the gang is stopped

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:  # f"{reason}" is its value on every Python, as str(reason) is
        return str(self.value).__format__(spec)


MESSAGES: Final[dict[Reason, str]] = {
    Reason.SPEC_ACCEPTED: "The spec is valid.",
    Reason.SPEC_INVALID: "The spec was refused: {problems}",
    Reason.PODS_PENDING: "Waiting for {nodes} pod(s) to be scheduled ({pending} pending).",
    Reason.PODS_STARTING: "Pods are starting; the trainer is loading the model and data.",
    Reason.UNSCHEDULABLE: "{pending} of {nodes} pod(s) could not be placed within spec.scheduling.gang.scheduleTimeoutSeconds ({seconds}s); the scheduler says: {scheduler}",
    Reason.TRAINING_RUNNING: "Training: step {step} of {total} ({percent}%).",
    Reason.TRAINING_STARTED: "All {nodes} pod(s) are running.",
    Reason.GANG_RESTARTING: "Rank failed ({cause}); restarting the whole gang from the last checkpoint (restart {restart} of {limit}).",
    Reason.GANG_SHRINKING: "{pending} of {nodes} pods unschedulable for {seconds}s; restarting the gang from the last checkpoint on {smaller} nodes (minNodes {minimum}; the global batch is kept; restart {restart} of {limit}).",
    Reason.NODE_LOST: "node {node} lost: Kubernetes evicted rank pod {pod} from it ({why}); the node stopped answering (powered off, crashed or cut off) and its pod's work since the last checkpoint is gone.",
    Reason.JOB_SUSPENDED: "Suspended: no pods run until spec.runPolicy.suspend is false (or a queue admits the job).",
    Reason.JOB_RESUMED: "Resumed.",
    Reason.QUEUED_BY_KUEUE: "Queued by Kueue in LocalQueue {queue}: {kueue}",
    Reason.ADMITTED_BY_KUEUE: "Admitted by Kueue (LocalQueue {queue}, ClusterQueue {cluster_queue}).",
    Reason.EVICTED_BY_KUEUE: "Evicted by Kueue ({why}): {kueue}. The gang checkpoints as it stops, waits in LocalQueue {queue} to be admitted again, then resumes from its newest checkpoint.",
    Reason.OUTPUT_IN_USE: "Waiting: spec.output.uri {uri} overlaps the output of FineTuneJob {holder} ({theirs}), which is still {phase}; this job cannot start before that one finishes, or set another spec.output.uri. Checked again every {every}s.",
    Reason.POD_GROUP_CREATED: "PodGroup {name} ({api}) created: the {scheduler} scheduler binds no pod until {min_member} can start together.",
    Reason.POD_GROUP_CRD_MISSING: "The cluster has no {crd} (the {scheduler} PodGroup API): install {scheduler}, or remove spec.scheduling.gang. No pods are created until it exists; checked again every {every}s.",
    Reason.TRAINING_SUCCEEDED: "Training finished; artifacts are under {uri}.",
    Reason.BACKOFF_LIMIT_EXCEEDED: "Failed after {restarts} restart(s); last failure: {cause}.",
    Reason.DEADLINE_EXCEEDED: "Ran longer than spec.runPolicy.activeDeadlineSeconds ({seconds}s).",
    Reason.NEW_RUN: "Run {run} for spec generation {generation}: {start}; writing to {uri}",
    Reason.SERVING_CREATED: "{kind} {name} created; it serves {uri}.",
    Reason.SERVING_API_MISSING: "The cluster has no {kind} API ({api}): install KServe's CRDs, or set spec.serving.kind: Deployment. The model stays at {uri}.",
    Reason.SERVING_REFUSED: "The API server refused {kind} {name}: {error}",
    Reason.SERVING_NAME_TAKEN: "{kind} {name} already exists and this FineTuneJob does not own it (left alone): set spec.serving.name to another name.",
    Reason.CHECKPOINT_REQUESTED: "{cause}: asked rank 0 ({pod}) to checkpoint at the next step boundary (every rank writes the same step){hold}.",
    Reason.CHECKPOINT_WRITTEN: "Checkpoint at step {step} written after {cause}: {uri}",
    Reason.CHECKPOINT_NOT_CONFIRMED: "{cause}: rank 0 did not confirm a checkpoint within {seconds}s (terminationGracePeriodSeconds); suspending anyway: the pods still checkpoint on SIGTERM, and a restart resumes from the newest complete checkpoint ({last}).",
    Reason.EVALUATED: "Evaluated: {figures}.",
    Reason.EVALUATION_PASSED: "Evaluation gate passed: {figures}.",
    Reason.EVALUATION_GATE_FAILED: "Evaluation gate failed; nothing published, artifacts kept for inspection: {figures}.",
    Reason.NETWORK_UNREACHABLE: "Pod {pod} could not reach a peer, so the gang was stopped (no restart: the network must change first): {detail}",
}
"""Reason -> message template, formatted with the keyword arguments given to `reason_message`."""


def reason_message(reason: Reason, **kwargs: Any) -> str:
    """The reason's message. A reason without a template is a ValueError, a missing argument a KeyError: both
    are bugs, which the tests find (tests/test_conditions.py)."""
    return MESSAGES[Reason(reason)].format(**kwargs)


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
    since = (
        old.last_transition_time
        if old is not None and old.status == value and old.last_transition_time
        else now
    )
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: ORDER.index(c.type) if c.type in ORDER else len(ORDER))


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
