"""Observed Job + pods + progress -> status, conditions and what the operator should do next. Pure.

Each policy is its own small function (failure, success, deadline, suspend), and
`derive()` puts them in order. The operator's timer gathers the observation,
calls `derive()`, writes the status, then performs the action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from kubetune.api import contract, methods
from kubetune.api.models import (
    Artifacts,
    Condition,
    EvaluationResult,
    FailureInfo,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    Progress,
)
from kubetune.api.names import ANNOTATION_RELEASED, COMPLETION_INDEX, CONTAINER, workload_name
from kubetune.api.schedulers import FLAVORS
from kubetune.status import conditions as c
from kubetune.status import elastic
from kubetune.status.progress import to_progress
from kubetune.status.queue import QueueState, held_words, queue_state
from kubetune.status.usage import PriceTable, accrue

Action = Literal["none", "create", "release", "restart", "recreate", "stop"]
TERMINAL = ("Succeeded", "Failed")
# Pods up this long with rank 0's progress never read: call it Running anyway (e.g. a NetworkPolicy
# keeps the operator from the progress port), and say so in the message.
PROGRESS_GRACE_SECONDS = 120
POD_FAILED: Final = "PodFailed"
"""A failed pod's reason when neither the trainer nor the kubelet gave one."""
JOB_FAILED: Final = "JobFailed"
NODE_EVICTIONS: Final = frozenset({"DeletionByTaintManager", "DeletionByPodGC"})
"""DisruptionTarget reasons of a pod Kubernetes deleted because of its node: the taint manager's eviction for a
NoExecute taint (node.kubernetes.io/unreachable or not-ready once nodeLossTolerationSeconds ran out), or the pod
garbage collector's for a node that is gone or out of service."""
"""A failed Job's reason when the Job controller gave none (no pod to ask)."""


@dataclass(frozen=True)
class Observed:
    """What the operator saw on one tick."""

    job: dict[str, Any] | None
    """The run's batch/v1 Job (`<name>-r0`), if it exists: every gang generation runs in it."""
    pods: list[dict[str, Any]] = field(default_factory=list)
    """Pods of the current gang generation (released by the operator, labelled with it)."""
    stale: int = 0
    """Pods of earlier generations still running or terminating, pods being deleted, other Jobs: the next
    generation is released (or a new Job created) once they are gone."""
    waiting: list[dict[str, Any]] = field(default_factory=list)
    """Pods of the Job still behind the gang gate: the next generation, until the operator releases it."""
    all_pods: list[dict[str, Any]] = field(default_factory=list)
    """Every pod of the job, of any generation."""
    progress: Progress | None = None
    """What rank 0 reported, if it could be read."""
    workload: dict[str, Any] | None = None
    """Kueue's Workload for the current Job (a Job with Kueue's queue label), once the watch has shown it."""
    resumed_seen: datetime | None = None
    """When the operator first saw the Job resumed while its status still said Suspended (`resumed_unseen`)."""


@dataclass(frozen=True)
class Failure:
    """A failed rank."""

    pod: str
    exit_code: int | None
    reason: str
    message: str
    finished_at: str = ""

    @property
    def retryable(self) -> bool:
        return self.exit_code is None or contract.is_retryable(self.exit_code)

    def describe(self) -> str:
        code = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        msg = f": {self.message}" if self.message else ""
        return f"pod {self.pod} {self.reason}{code}{msg}"

    def to_status(self) -> FailureInfo:
        return FailureInfo(pod=self.pod, exit_code=self.exit_code, reason=self.reason, message=self.message)


@dataclass(frozen=True)
class Decision:
    status: FineTuneJobStatus
    """The new status; the fields set are what is written (FineTuneJobStatus.to_patch)."""
    action: Action = "none"
    """create: create the run's Job; release: start the waiting pods as the current generation; restart: delete
    the failed generation's pods (the Job controller replaces them; a Job that cannot run again is deleted and
    the next tick creates a new one); stop: delete the Job because the job is over."""
    event: tuple[str, str, str] | None = None
    """(type, reason, message) to record when the phase changed."""


def iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ failures


def _trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's status in a pod ({} until the kubelet reports it)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return {}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    cs = _trainer_status(pod)
    state = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return state if isinstance(state, dict) else None


def _message(term: dict[str, Any]) -> contract.TerminationMessage | None:
    """The trainer's termination message, or None when the container left something else."""
    return contract.TerminationMessage.parse(term.get("message"))


def pod_failure(pod: dict[str, Any]) -> Failure | None:
    """Why a pod failed: the trainer's JSON termination message first, then the exit code, then the pod."""
    status = pod.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    name = (pod.get("metadata") or {}).get("name", "?")
    term = _terminated(pod)
    if term is None:
        return Failure(name, None, status.get("reason") or POD_FAILED, status.get("message") or "")
    code: int | None = term.get("exitCode")
    reason, message = "", (term.get("message") or "").strip()
    if (parsed := _message(term)) is not None:
        # torchrun exits 1 whatever its child did: the trainer's own code is in the message.
        code, reason, message = parsed.exit_code, parsed.reason, parsed.message
    if not reason:
        reason = contract.REASONS.get(code, "") if code is not None else ""
    if not reason:
        reason = term.get("reason") or status.get("reason") or "Error"
    if len(message) > 1024:
        message = "..." + message[-1024:]
    return Failure(name, code, reason, message, term.get("finishedAt") or "")


def lost_node(pod: dict[str, Any]) -> str | None:
    """The node a pod was lost with, if Kubernetes deleted the pod because of its node (NODE_EVICTIONS): a
    node that stopped answering, whose kubelet will never finish the pod's deletion."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if not meta.get("deletionTimestamp"):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            if cond.get("reason") in NODE_EVICTIONS:
                return str((pod.get("spec") or {}).get("nodeName") or "?")
    return None


def node_lost_failure(pod: dict[str, Any]) -> Failure | None:
    """A rank lost with its node, as a retryable failure whose reason is NodeLost and whose message names the node."""
    node = lost_node(pod)
    if node is None:
        return None
    meta = pod.get("metadata") or {}
    why = next(
        (x.get("message") or x.get("reason") for x in (pod.get("status") or {}).get("conditions") or []
         if x.get("type") == "DisruptionTarget"),
        "",
    )  # fmt: skip
    name = meta.get("name", "?")
    message = c.reason_message(c.Reason.NODE_LOST, node=node, pod=name, why=why)
    return Failure(name, None, c.Reason.NODE_LOST.value, message, meta.get("deletionTimestamp") or "")


def decisive_failure(pods: list[dict[str, Any]]) -> Failure | None:
    """The failure that decides: a user error if any rank had one, else a rank lost with its node (the cause of
    its peers' errors), else the first rank to fail."""
    # Pods being deleted (suspend, restart) are not failures, except those Kubernetes deleted for their node.
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    failures = [f for f in (pod_failure(p) for p in live) if f is not None]
    lost = [f for f in (node_lost_failure(p) for p in pods) if f is not None]
    if not failures and not lost:
        return None
    user = [f for f in failures if not f.retryable]
    pool = user or lost or failures
    return sorted(pool, key=lambda f: (f.finished_at or "~", f.pod))[0]


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


# ------------------------------------------------------------------ policies


def artifacts(spec: FineTuneJobSpec) -> Artifacts:
    """Where a successful job's results are, from spec.output.uri and the contract's layout."""
    base = spec.output.uri.rstrip("/")
    return Artifacts(
        checkpoint=f"{base}/{contract.CHECKPOINTS_DIR}/",
        adapter=f"{base}/{contract.ADAPTER_DIR}/" if methods.is_adapter(spec) else None,
        merged_model=f"{base}/{contract.MERGED_DIR}/" if methods.writes_full_model(spec) else None,
        metrics=f"{base}/{contract.METRICS_FILE}",
        manifest=f"{base}/{contract.MANIFEST_FILE}",
        interpolation=f"{base}/{contract.INTERPOLATION_DIR}/"
        if spec.output.interpolate and spec.output.keep_mixes
        else None,
    )


def deadline_exceeded(spec: FineTuneJobSpec, start_time: str | None, now: datetime) -> bool:
    limit = spec.run_policy.active_deadline_seconds
    start = elastic.parse_time(start_time)
    return bool(limit and start and (now - start).total_seconds() > limit)


def _running_since(pods: list[dict[str, Any]]) -> datetime | None:
    """When the last of the trainer containers started running."""
    starts = [
        elastic.parse_time(((_trainer_status(p).get("state") or {}).get("running") or {}).get("startedAt"))
        for p in pods
    ]
    known = [t for t in starts if t is not None]
    return max(known) if known else None


def _pod_phase(
    spec: FineTuneJobSpec,
    pods: list[dict[str, Any]],
    progress: Progress | None,
    old_phase: str | None,
    now: datetime,
    gang: int | None = None,
) -> tuple[Phase, str, str]:
    """(phase, reason, message) of a live, unsuspended gang of `gang` nodes (default spec.distributed.nodes)."""
    nodes = gang or spec.distributed.nodes
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    up = sum(1 for ph in phases if ph in ("Running", "Succeeded"))
    scheduled = sum(1 for p in pods if (p.get("spec") or {}).get("nodeName"))
    if up >= nodes:
        if progress is not None and progress.trainer_phase == contract.TrainerPhase.INITIALIZING:
            return "Initializing", c.Reason.PODS_STARTING, c.reason_message(c.Reason.PODS_STARTING)
        if progress is not None and progress.step is not None:
            msg = c.reason_message(
                c.Reason.TRAINING_RUNNING,
                step=progress.step,
                total=progress.total_steps or "?",
                percent=progress.percent or 0,
            )
            return "Running", c.Reason.TRAINING_RUNNING, msg
        if progress is None and old_phase != "Running":
            # The trainer serves progress once it is up; until then it is still starting. Never step back
            # from Running because one read failed.
            since = _running_since(pods)
            if since is None or (now - since).total_seconds() < PROGRESS_GRACE_SECONDS:
                return "Initializing", c.Reason.PODS_STARTING, c.reason_message(c.Reason.PODS_STARTING)
        return "Running", c.Reason.TRAINING_STARTED, c.reason_message(c.Reason.TRAINING_STARTED, nodes=nodes)
    if scheduled or up:
        return "Initializing", c.Reason.PODS_STARTING, c.reason_message(c.Reason.PODS_STARTING)
    return (
        "Pending",
        c.Reason.PODS_PENDING,
        c.reason_message(c.Reason.PODS_PENDING, nodes=nodes, pending=nodes - up),
    )


def _final_message(pods: list[dict[str, Any]]) -> contract.TerminationMessage | None:
    """Rank 0's termination message, once its pod has finished."""
    for p in pods:
        if ((p.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX) != "0":
            continue
        if (parsed := _message(_terminated(p) or {})) is not None:
            return parsed
    return None


def final_evaluation(pods: list[dict[str, Any]]) -> EvaluationResult | None:
    """Rank 0's evaluation of the final model (spec.evaluation), from its termination message, passed or failed."""
    parsed = _final_message(pods)
    return parsed.evaluation if parsed is not None else None


def _evaluated(
    conds: list[Condition], evaluation: EvaluationResult, now: str, generation: int | None
) -> list[Condition]:
    """The Evaluated condition: True with the figures, or False (EvaluationGateFailed) naming each missed threshold."""
    ok = evaluation.gate_passed is not False
    reason = (
        c.Reason.EVALUATION_GATE_FAILED
        if not ok
        else (c.Reason.EVALUATION_PASSED if evaluation.gate_passed else c.Reason.EVALUATED)
    )
    return c.set_condition(
        conds,
        c.EVALUATED,
        ok,
        reason,
        c.reason_message(reason, figures=evaluation.summary()),
        now,
        generation,
    )


def with_progress(status: FineTuneJobStatus, progress: Progress) -> FineTuneJobStatus:
    """status.progress from rank 0's report; its place in MLflow / W&B (spec.tracking) to status.tracking and
    its network check to status.network (kept there, not repeated in status.progress)."""
    status = _set(status, progress=progress.model_copy(update={"network": None}))
    if progress.tracking is not None:
        status = _set(status, tracking=progress.tracking)
    if progress.network is not None:
        status = _set(status, network=progress.network)
    return status


def final_progress(pods: list[dict[str, Any]], now: datetime) -> Progress | None:
    """The progress rank 0 left in its termination message when it finished (the last poll may be a step behind)."""
    parsed = _final_message(pods)
    return (
        to_progress(parsed.progress, iso(now)) if parsed is not None and parsed.progress is not None else None
    )


def final_artifacts(spec: FineTuneJobSpec, pods: list[dict[str, Any]]) -> Artifacts:
    """The layout's artifacts, plus what rank 0 reported publishing (the digest-pinned OCI reference)."""
    parsed = _final_message(pods)
    reported = parsed.artifacts if parsed is not None and parsed.artifacts is not None else None
    return artifacts(spec).model_copy(
        update={
            "oci": reported.oci if reported else None,
            "huggingface": reported.huggingface if reported else None,
        }
    )


# ------------------------------------------------------------------ gang generations


def _index(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX)


def _live(pod: dict[str, Any]) -> bool:
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and (pod.get("status") or {}).get(
        "phase"
    ) not in ("Succeeded", "Failed")


def rank_taken(observed: Observed) -> Failure | None:
    """A rank of the running generation that someone else deleted (kubectl delete, an eviction): the Job controller
    replaces its pod, but torchrun's static rendezvous takes no new rank into a running gang, so the gang restarts.
    Seen once the deleted pod has stopped (while it stops, rank 0 is asked for a checkpoint: controller/checkpoints),
    or (that missed) as its replacement waiting behind the gang gate. Only while a peer still runs: a gang that went
    whole (a suspend, a queue's eviction) starts again as the same generation once its pods are back."""
    if not any(_live(p) for p in observed.pods):
        return None
    for pod in observed.pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") and (pod.get("status") or {}).get("phase") == "Failed":
            return pod_failure(pod) or Failure(
                meta.get("name", "?"),
                None,
                POD_FAILED,
                "deleted while the gang ran",
                meta["deletionTimestamp"],
            )
    if observed.waiting:
        index = _index(observed.waiting[0])
        return Failure(observed.waiting[0]["metadata"].get("name", "?"), None, POD_FAILED,
                       f"rank {index}'s pod was deleted while the gang ran (the Job controller replaced it)")  # fmt: skip
    return None


JOB_STUCK_SECONDS: Final = 60
"""A pod stopped this long ago that still carries the Job controller's tracking finalizer: the Job controller
cannot update the Job (seen on Kubernetes 1.32 after a quick suspend and resume: "startTime cannot be removed for
unsuspended job", for good), so it will neither let the pod go nor replace it."""
JOB_TRACKING_FINALIZER: Final = "batch.kubernetes.io/job-tracking"


def resumed_unseen(job: dict[str, Any] | None) -> bool:
    """The Job is resumed (spec.suspend false) but its status still says Suspended: the Job controller has not
    caught up yet, or (Kubernetes 1.32, `job_stuck`) never will."""
    return (
        job is not None
        and not (job.get("spec") or {}).get("suspend")
        and _job_condition(job, "Suspended") is not None
    )


def job_stuck(
    job: dict[str, Any], pods: list[dict[str, Any]], now: datetime, resumed_seen: datetime | None = None
) -> str | None:
    """What shows that the Job controller cannot update the Job, if anything: a stopped, deleted pod it has not let
    go of for JOB_STUCK_SECONDS, or a Job resumed that long ago whose status still says Suspended. The resume is
    dated by the later of the Suspended condition's transition and `resumed_seen` (when the operator first saw the
    Job resumed): a queue that held the Job for minutes and resumed it a moment ago (Kueue, after a preemption)
    left a Suspended condition minutes old that the Job controller is about to turn over."""
    suspended = _job_condition(job, "Suspended")
    since = elastic.parse_time((suspended or {}).get("lastTransitionTime"))
    if since is not None and resumed_seen is not None:
        since = max(since, resumed_seen)
    if resumed_unseen(job) and since is not None and (now - since).total_seconds() > JOB_STUCK_SECONDS:
        return f"Job {job['metadata'].get('name')} resumed but still Suspended"
    for pod in pods:
        meta = pod.get("metadata") or {}
        term = _terminated(pod) or {}
        done = elastic.parse_time(term.get("finishedAt"))
        if (
            meta.get("deletionTimestamp")
            and JOB_TRACKING_FINALIZER in (meta.get("finalizers") or [])
            and (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and done is not None
            and (now - done).total_seconds() > JOB_STUCK_SECONDS
        ):
            return f"pod {meta.get('name', '?')} stopped but not let go"
    return None


def releasable(observed: Observed, nodes: int) -> bool:
    """The waiting pods can start as the gang: nothing of an earlier generation is left, and every rank has a pod."""
    ranks = {_index(p) for p in observed.waiting} | {_index(p) for p in observed.pods if _live(p)}
    return bool(observed.waiting) and not observed.stale and {str(i) for i in range(nodes)} <= ranks


def in_place(job: dict[str, Any], pods: list[dict[str, Any]], nodes: int) -> bool:
    """Whether the Job can run the next gang generation: it ignores pod failures and gates its pods (a Job an older
    operator created does neither), it has not failed, and no index of it has completed (the Job controller would
    not run a completed index again), and it has the next gang's size `nodes` (an elastic gang that shrinks or
    grows back gets a Job of its size)."""
    if (
        not (job.get("spec") or {}).get("podFailurePolicy")
        or (job.get("spec") or {}).get("parallelism") != nodes
    ):
        return False
    if _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        return False
    if (job.get("status") or {}).get("completedIndexes"):
        return False
    return not any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods)


def _released_at(pod: dict[str, Any]) -> datetime | None:
    meta = pod.get("metadata") or {}
    return elastic.parse_time((meta.get("annotations") or {}).get(ANNOTATION_RELEASED)) or elastic.parse_time(
        meta.get("creationTimestamp")
    )


def _unscheduled(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Live pods the scheduler has not bound."""
    return [p for p in pods if _live(p) and not (p.get("spec") or {}).get("nodeName")]


def placement_deadline(spec: FineTuneJobSpec, pods: list[dict[str, Any]]) -> datetime | None:
    """When a gang not yet placed is Unschedulable: its release plus spec.scheduling.gang.scheduleTimeoutSeconds
    (None without that timeout, or when every pod is bound)."""
    gang = spec.scheduling.gang if spec.scheduling is not None else None
    if gang is None or gang.schedule_timeout_seconds is None or not (waiting := _unscheduled(pods)):
        return None
    times = [t for t in (_released_at(p) for p in waiting) if t is not None]
    return max(times) + timedelta(seconds=gang.schedule_timeout_seconds) if times else None


def scheduler_message(pods: list[dict[str, Any]]) -> str:
    """Why the scheduler left a pod unbound: its PodScheduled=False condition's message."""
    for pod in _unscheduled(pods):
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("message"):
                return str(cond["message"])
    return "no reason given yet"


# ------------------------------------------------------------------ derive


def _set(status: FineTuneJobStatus, **changes: Any) -> FineTuneJobStatus:
    """`status` with `changes` (snake_case field names, typed values) set."""
    if unknown := set(changes) - set(FineTuneJobStatus.model_fields):
        raise TypeError(
            f"not FineTuneJobStatus fields: {sorted(unknown)}"
        )  # model_copy would keep them as extras
    return status.model_copy(update=changes)


def derive(
    spec: FineTuneJobSpec,
    name: str,
    generation: int | None,
    old: FineTuneJobStatus | None,
    observed: Observed,
    now: datetime,
    prices: PriceTable | None = None,
) -> Decision:
    """The new status and the next action, from the old status and what was observed; `prices` (the
    operator's price table) turns status.usage into an estimated cost."""
    old = old or FineTuneJobStatus()
    ts = iso(now)
    restarts = old.restarts
    job = observed.job
    workload = job["metadata"]["name"] if job is not None else (old.workload or workload_name(name))
    status = _set(old, restarts=restarts, observed_generation=generation, workload=workload)
    if observed.progress is not None:
        status = with_progress(status, observed.progress)
    action: Action = "none"

    if old.phase in TERMINAL:
        return Decision(status=status)

    if job is not None and not (job.get("spec") or {}).get("suspend") and not status.start_time:
        status = _set(status, start_time=ts)

    nodes = elastic.gang_nodes(spec, old.gang_nodes)
    if spec.distributed.elastic:
        status = _set(status, gang_nodes=nodes, world_size=nodes * spec.distributed.procs_per_node)
    phase: Phase = "Pending"
    reason: str = c.Reason.PODS_PENDING  # or a failed rank's own reason (the trainer's, or Kubernetes')
    message = c.reason_message(c.Reason.PODS_PENDING, nodes=nodes, pending=nodes)
    failure: Failure | None = None
    evaluation: EvaluationResult | None = None
    if deadline_exceeded(spec, status.start_time, now):
        phase, reason = "Failed", c.Reason.DEADLINE_EXCEEDED
        message = c.reason_message(reason, seconds=spec.run_policy.active_deadline_seconds)
        action = "stop" if job is not None else "none"
    elif job is None:
        if restarts and old.phase == "Restarting":
            phase, reason, message = "Restarting", c.Reason.GANG_RESTARTING, old.message or ""
        elif spec.run_policy.suspend:
            phase, reason, message = (
                "Suspended",
                c.Reason.JOB_SUSPENDED,
                c.reason_message(c.Reason.JOB_SUSPENDED),
            )
        action = "none" if observed.stale else "create"
    elif _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        phase, reason = "Succeeded", c.Reason.TRAINING_SUCCEEDED
        message = c.reason_message(reason, uri=spec.output.uri)
        status = _set(status, artifacts=final_artifacts(spec, observed.pods))
        if (final := final_progress(observed.pods, now)) is not None:
            status = with_progress(status, final)  # with the registered model version
        evaluation = final_evaluation(observed.pods)
    elif (job.get("spec") or {}).get("suspend"):
        queued = _queued(old, job, observed.workload)
        if queued is not None and queued.evicted is not None and not spec.run_policy.suspend:
            # Kueue evicted it (a higher priority preempted it): Pending again, in Kueue's words for why, until
            # Kueue admits it again (its Evicted condition stays True until then: one status write, not one per
            # rewording of its queue message)
            phase, reason, message = "Pending", c.Reason.EVICTED_BY_KUEUE, _eviction_message(queued)
        elif queued is not None and not queued.admitted:  # Kueue holds it: Pending, in Kueue's words
            phase, reason = "Pending", c.Reason.QUEUED_BY_KUEUE
            message = c.reason_message(reason, queue=queued.queue, kueue=queued.message)
        elif queued is not None and not spec.run_policy.suspend:
            # Admitted, and Kueue unsuspends the Job next: still Pending (not a Suspended flicker between
            # "queued" and "starting", which cost every queued job two phase changes and a status write)
            phase, reason = "Pending", c.Reason.ADMITTED_BY_KUEUE
            message = c.reason_message(reason, queue=queued.queue, cluster_queue=queued.cluster_queue or "?")
        else:
            phase, reason, message = (
                "Suspended",
                c.Reason.JOB_SUSPENDED,
                c.reason_message(c.Reason.JOB_SUSPENDED),
            )
    elif (failure := decisive_failure(observed.pods) or rank_taken(observed)) is not None or _job_condition(
        job, "Failed"
    ):
        if failure is None:
            cond = _job_condition(job, "Failed") or {}
            failure = Failure(
                job["metadata"]["name"], None, cond.get("reason") or JOB_FAILED, cond.get("message") or ""
            )
        status = _set(status, last_failure=failure.to_status())
        evaluation = final_evaluation(observed.pods)  # a failed gate: the figures it failed on
        if not failure.retryable:
            phase, reason, message = "Failed", failure.reason, failure.describe()
            if reason == c.Reason.NETWORK_UNREACHABLE:
                message = c.reason_message(
                    c.Reason.NETWORK_UNREACHABLE, pod=failure.pod, detail=failure.message
                )
            action = "stop"
        elif restarts < spec.run_policy.backoff_limit:
            status = _set(status, restarts=restarts + 1)
            if (
                spec.distributed.elastic
            ):  # each restart tries the whole gang again: it grows back when nodes returned
                status = _set(
                    status, gang_nodes=spec.distributed.nodes, world_size=spec.distributed.world_size
                )
            phase, reason = "Restarting", c.Reason.GANG_RESTARTING
            message = c.reason_message(
                reason, cause=failure.describe(), restart=restarts + 1, limit=spec.run_policy.backoff_limit
            )
            action = "restart"
        else:
            phase, reason = "Failed", c.Reason.BACKOFF_LIMIT_EXCEEDED
            message = c.reason_message(reason, restarts=restarts, cause=failure.describe())
            action = "stop"
    elif (
        smaller := elastic.shrink_to(spec, nodes, observed.pods, now)
    ) is not None and restarts < spec.run_policy.backoff_limit:
        status = _set(status, restarts=restarts + 1, gang_nodes=smaller,
                      world_size=smaller * spec.distributed.procs_per_node)  # fmt: skip
        phase, reason, action = "Restarting", c.Reason.GANG_SHRINKING, "restart"
        message = c.reason_message(reason, pending=len(elastic.waiting(observed.pods)), nodes=nodes,
                                   seconds=spec.distributed.elastic_wait_seconds, smaller=smaller,
                                   minimum=spec.distributed.min_nodes, restart=restarts + 1,
                                   limit=spec.run_policy.backoff_limit)  # fmt: skip
    elif not observed.pods and restarts and old.phase == "Restarting":
        phase, reason, message = "Restarting", c.Reason.GANG_RESTARTING, old.message or ""
    else:
        phase, reason, message = _pod_phase(spec, observed.pods, observed.progress, old.phase, now, nodes)
        if phase != "Running" and (due := placement_deadline(spec, observed.pods)) is not None and now >= due:
            phase, reason = "Pending", c.Reason.UNSCHEDULABLE
            message = c.reason_message(reason, pending=len(_unscheduled(observed.pods)), nodes=nodes,
                                       seconds=spec.scheduling.gang.schedule_timeout_seconds,  # type: ignore[union-attr]
                                       scheduler=scheduler_message(observed.pods))  # fmt: skip
    if (
        action == "none"
        and job is not None
        and not (job.get("spec") or {}).get("suspend")
        and phase not in TERMINAL
        and releasable(observed, nodes)
    ):
        action = "release"
    elif (
        action == "none"
        and job is not None
        and phase not in TERMINAL
        and job_stuck(job, observed.all_pods, now, observed.resumed_seen)
    ):
        action = "recreate"  # the Job cannot go on: a new one (the next pass creates it once the old pods are gone)

    if phase in TERMINAL:
        status = _set(status, completion_time=ts)
    conditions = phase_conditions(status.conditions, phase, reason, message, ts, generation)
    if phase not in TERMINAL and (queued := _queued(old, job, observed.workload)) is not None:
        conditions = _admitted(conditions, queued, ts, generation)
    if job is not None and spec.scheduling is not None and spec.scheduling.gang is not None:
        gang = spec.scheduling.gang  # the PodGroup is created before the Job: a Job means it exists
        msg = c.reason_message(c.Reason.POD_GROUP_CREATED, name=name, api=FLAVORS[gang.scheduler].api_version, scheduler=gang.scheduler,
                               min_member=gang.min_member or (spec.distributed.min_nodes if spec.distributed.elastic else nodes))  # fmt: skip
        conditions = c.set_condition(
            conditions, c.GANG_READY, True, c.Reason.POD_GROUP_CREATED, msg, ts, generation
        )
    usage = accrue(old.usage, old.phase, phase, observed.pods, spec, status.run, now, prices)
    status = _set(status, phase=phase, message=message, conditions=conditions, usage=usage)
    if evaluation is not None:
        status = _set(
            status, evaluation=evaluation, conditions=_evaluated(conditions, evaluation, ts, generation)
        )
    event = None
    was = c.get_condition(old.conditions, c.RUNNING)
    if phase != old.phase or (reason == c.Reason.UNSCHEDULABLE and (was is None or was.reason != reason)):
        warn = phase in ("Failed", "Restarting") or reason in (
            c.Reason.UNSCHEDULABLE,
            c.Reason.EVICTED_BY_KUEUE,
        )
        kind = "Warning" if warn else "Normal"
        # a gang restarted (or failed) for a lost node: the Event's reason says so, its message names the node
        lost = (
            failure is not None and failure.reason == c.Reason.NODE_LOST and phase in ("Failed", "Restarting")
        )
        event = (kind, c.Reason.NODE_LOST.value if lost else reason, message)
    return Decision(status=status, action=action, event=event)


def phase_conditions(
    old: list[Condition], phase: str, reason: str, message: str, now: str, generation: int | None
) -> list[Condition]:
    out = list(old)
    if c.get_condition(out, c.SPEC_VALID) is None:
        out = c.set_condition(
            out,
            c.SPEC_VALID,
            True,
            c.Reason.SPEC_ACCEPTED,
            c.reason_message(c.Reason.SPEC_ACCEPTED),
            now,
            generation,
        )
    out = c.set_condition(out, c.RUNNING, phase == "Running", reason, message, now, generation)
    suspended = phase == "Suspended"
    prev = c.get_condition(out, c.SUSPENDED)
    if suspended:
        out = c.set_condition(out, c.SUSPENDED, True, c.Reason.JOB_SUSPENDED, message, now, generation)
    elif prev is not None and prev.status == "True":
        out = c.set_condition(
            out,
            c.SUSPENDED,
            False,
            c.Reason.JOB_RESUMED,
            c.reason_message(c.Reason.JOB_RESUMED),
            now,
            generation,
        )
    if phase == "Succeeded":
        out = c.set_condition(out, c.SUCCEEDED, True, reason, message, now, generation)
    if phase == "Failed":
        out = c.set_condition(out, c.FAILED, True, reason, message, now, generation)
    return out


def _queued(
    old: FineTuneJobStatus, job: dict[str, Any] | None, workload: dict[str, Any] | None
) -> QueueState | None:
    """Kueue's view of the gang, in the words the status already shows while the same wait goes on."""
    state = queue_state(job, workload)
    if state is None:
        return None
    shown = c.get_condition(old.conditions, c.ADMITTED)
    template = c.reason_message(c.Reason.QUEUED_BY_KUEUE, queue=state.queue, kueue="")
    held = shown is not None and shown.reason == c.Reason.QUEUED_BY_KUEUE
    return held_words(state, shown.message if held and shown else None, template)


def _eviction_message(queued: QueueState) -> str:
    return c.reason_message(c.Reason.EVICTED_BY_KUEUE, why=queued.evicted_reason or "Evicted",
                            kueue=(queued.evicted or "").rstrip("."), queue=queued.queue)  # fmt: skip


def _admitted(
    conds: list[Condition], queued: QueueState, now: str, generation: int | None
) -> list[Condition]:
    """The Admitted condition of a job in a Kueue queue: False (QueuedByKueue, Kueue's reason) until admitted,
    False (EvictedByKueue, Kueue's words) from an eviction until admitted again."""
    if queued.evicted is not None:
        msg = _eviction_message(queued)
        return c.set_condition(conds, c.ADMITTED, False, c.Reason.EVICTED_BY_KUEUE, msg, now, generation)
    if queued.admitted:
        msg = c.reason_message(
            c.Reason.ADMITTED_BY_KUEUE, queue=queued.queue, cluster_queue=queued.cluster_queue or "?"
        )
        return c.set_condition(conds, c.ADMITTED, True, c.Reason.ADMITTED_BY_KUEUE, msg, now, generation)
    msg = c.reason_message(c.Reason.QUEUED_BY_KUEUE, queue=queued.queue, kueue=queued.message)
    return c.set_condition(conds, c.ADMITTED, False, c.Reason.QUEUED_BY_KUEUE, msg, now, generation)


def pod_group_missing(
    old: FineTuneJobStatus, crd: str, spec: FineTuneJobSpec, generation: int | None, now: datetime
) -> dict[str, Any]:
    """Decision fields for a job whose gang scheduler's PodGroup CRD is absent: Pending, PodGroupReady=False naming
    the CRD, and a Warning once (not again while it stays missing)."""
    ts = iso(now)
    scheduler = spec.scheduling.gang.scheduler if spec.scheduling and spec.scheduling.gang else "?"
    reason = c.Reason.POD_GROUP_CRD_MISSING
    message = c.reason_message(reason, crd=crd, scheduler=scheduler, every=30)
    conds = phase_conditions(old.conditions, "Pending", reason, message, ts, generation)
    conds = c.set_condition(conds, c.GANG_READY, False, reason, message, ts, generation)
    prev = c.get_condition(old.conditions, c.GANG_READY)
    event = None if prev is not None and prev.reason == reason else ("Warning", reason, message)
    status = _set(old, phase="Pending", message=message, observed_generation=generation, conditions=conds)
    return {"status": status, "event": event}


def refused_status(
    old: FineTuneJobStatus | None, problems: list[str], generation: int | None, now: datetime
) -> FineTuneJobStatus:
    """The status of a spec the operator refuses: Failed, SpecValid=False naming each field and fix."""
    ts = iso(now)
    old = old or FineTuneJobStatus()
    message = c.reason_message(c.Reason.SPEC_INVALID, problems="; ".join(problems))
    conds = c.set_condition(
        old.conditions, c.SPEC_VALID, False, c.Reason.SPEC_INVALID, message, ts, generation
    )
    conds = c.set_condition(conds, c.FAILED, True, c.Reason.SPEC_INVALID, message, ts, generation)
    return FineTuneJobStatus(
        phase="Failed",
        message=message,
        observed_generation=generation,
        restarts=old.restarts,
        completion_time=ts,
        conditions=conds,
    )


def ttl_expired(spec: FineTuneJobSpec, status: FineTuneJobStatus | None, now: datetime) -> bool:
    """A finished job whose ttlSecondsAfterFinished has passed (the operator deletes it)."""
    ttl = spec.run_policy.ttl_seconds_after_finished
    status = status or FineTuneJobStatus()
    done = elastic.parse_time(status.completion_time)
    return (
        ttl is not None
        and status.phase in TERMINAL
        and done is not None
        and (now - done).total_seconds() >= ttl
    )
