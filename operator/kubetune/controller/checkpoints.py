"""A checkpoint before any eviction: when something is about to stop a running gang (status.disruption), ask
rank 0 for a checkpoint at the next step boundary (POST to its progress port; all ranks write that step together),
record it (Events, status.lastCheckpoint), and, where the operator stops the pods itself (spec.runPolicy.suspend),
hold the stop until the checkpoint is written, at most terminationGracePeriodSeconds.

Why HTTP to rank 0 and not an annotation the pods read: the operator already reaches rank 0's progress port; a
downward-API file is refreshed on the kubelet's sync period (a minute or more), pods would need to poll it, and a
patch on every pod is one API write per rank. The request reaches the trainer in milliseconds and costs no API call.

Trigger detection is `status.disruption` (pure); this module only acts on it, and leaves the gang's restart to the
reconcile's own decision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import TrainerPhase
from kubetune.api.models import CheckpointRecord, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.names import COMPLETION_INDEX
from kubetune.controller.cluster import Cluster
from kubetune.controller.store import Ask, Key, Store
from kubetune.status import conditions as c
from kubetune.status import disruption as d
from kubetune.status.derive import Observed

log = logging.getLogger("kubetune.checkpoints")


@dataclass(frozen=True)
class Plan:
    status: FineTuneJobStatus
    """The decided status with lastCheckpoint brought up to date."""
    hold: bool = False
    """Do not stop the pods yet (the suspend waits for the checkpoint)."""
    wake: float | None = None
    """Look again in this many seconds (the end of the wait)."""


TRAINING_PHASES = (TrainerPhase.TRAINING.value, TrainerPhase.EVALUATING.value, TrainerPhase.SAVING.value)
"""What rank 0 says it is doing when a request can be served: the step loop runs (before it, there is nothing new
to keep, and a stop signal ends the rank at once)."""


def _rank0(observed: Observed, store: Store, key: Key) -> dict[str, Any] | None:
    """This gang's rank 0, running, with its step loop under way (as its last progress read said)."""
    seen = store.seen_progress(key)
    for pod in observed.pods:
        meta, st = pod["metadata"], pod.get("status") or {}
        if (
            (meta.get("annotations") or {}).get(COMPLETION_INDEX) != "0"
            or st.get("phase") != "Running"
            or not st.get("podIP")
        ):
            continue
        if seen is not None and seen.pod == meta["name"] and seen.progress.trainer_phase in TRAINING_PHASES:
            return pod
    return None


def _served(observed: Observed, store: Store, key: Key) -> tuple[int, CheckpointRecord | None]:
    """Checkpoint requests rank 0 served and the checkpoint it last named: from the progress read of this gang's rank 0
    and from the termination messages of its finished ranks."""
    names = {p["metadata"]["name"] for p in observed.pods}
    seen = store.seen_progress(key)
    served, last = 0, None
    if seen is not None and seen.pod in names:
        served, last = seen.served, seen.checkpoint
    for progress in d.final_progresses(observed.pods):
        count = progress.get("checkpointRequests")
        served = max(served, count if isinstance(count, int) else 0)
        last = d.newest_checkpoint(last, d.reported_checkpoint(progress))
    return served, last


def plan(
    key: Key,
    spec: FineTuneJobSpec,
    status: FineTuneJobStatus,
    observed: Observed,
    store: Store,
    kube: Cluster,
    steady: bool = True,
) -> Plan:
    """`steady`: the reconcile keeps the gang as it is this pass (no restart, stop or create): only then is a
    checkpoint asked for."""
    served, reported = _served(observed, store, key)
    last = d.newest_checkpoint(status.last_checkpoint, reported)
    if last != status.last_checkpoint:
        status = status.model_copy(update={"last_checkpoint": last})
    found = d.disruption(spec, observed.job, observed.pods, observed.workload) if steady else None
    ask = store.asks.get(key)
    if found is None:
        if ask is not None and (ask.written or ask.expired or ask.requested is None):
            store.asks.pop(key, None)  # kept while the checkpoint is owed: its Event says when it is written
        ask = store.asks.get(key)
        if ask is None:
            return Plan(status)
    rank0 = _rank0(observed, store, key)
    gang = f"{(observed.job or {}).get('metadata', {}).get('uid')}/{(rank0 or {}).get('metadata', {}).get('name')}"
    body = store.ftj(key) or {"metadata": {"namespace": key[0], "name": key[1]}}
    if found is not None and (ask is None or (ask.gang != gang and rank0 is not None)):
        ask = _ask(found, gang, rank0, spec, body, kube)
        store.asks[key] = ask
    assert ask is not None
    if ask.requested is not None and served >= ask.requested and not ask.written:
        ask.written = True
        shown = last or CheckpointRecord(step=0, uri="?", time="")
        kube.post_event(body, "Normal", str(c.Reason.CHECKPOINT_WRITTEN),
                        c.reason_message(c.Reason.CHECKPOINT_WRITTEN, step=shown.step, uri=shown.uri, cause=ask.cause))  # fmt: skip
        log.info("%s/%s: checkpoint step %s written after %s", *key, shown.step, ask.cause)
    if found is None or not found.held or ask.requested is None or ask.written:
        return Plan(status)
    grace = spec.termination_grace_period_seconds
    left = ask.asked_at + grace - time.time()
    if left > 0:
        return Plan(status, hold=True, wake=max(0.5, left))
    if not ask.expired:
        ask.expired = True
        shown_last = f"step {last.step}, {last.uri}" if last else "none yet"
        kube.post_event(body, "Warning", str(c.Reason.CHECKPOINT_NOT_CONFIRMED),
                        c.reason_message(c.Reason.CHECKPOINT_NOT_CONFIRMED, cause=ask.cause, seconds=grace, last=shown_last))  # fmt: skip
    return Plan(status)


def _ask(
    found: d.Disruption,
    gang: str,
    rank0: dict[str, Any] | None,
    spec: FineTuneJobSpec,
    body: dict[str, Any],
    kube: Cluster,
) -> Ask:
    answer = kube.request_checkpoint(rank0) if rank0 is not None else None
    requested = answer.get("requested") if answer else None
    ask = Ask(
        gang=gang,
        cause=found.cause,
        asked_at=time.time(),
        requested=requested if isinstance(requested, int) else None,
    )
    meta = body["metadata"]
    if ask.requested is None:
        log.info("%s/%s: %s; rank 0 not reachable for a checkpoint request (the ranks checkpoint on SIGTERM)",
                 meta["namespace"], meta["name"], found.cause)  # fmt: skip
        return ask
    hold = (
        f"; the pods are suspended once it is written (at most {spec.termination_grace_period_seconds}s)"
        if found.held
        else ""
    )
    pod = (rank0 or {}).get("metadata", {}).get("name", "?")
    kube.post_event(body, "Normal", str(c.Reason.CHECKPOINT_REQUESTED),
                    c.reason_message(c.Reason.CHECKPOINT_REQUESTED, cause=found.cause, pod=pod, hold=hold))  # fmt: skip
    log.info("%s/%s: %s: checkpoint requested of %s", meta["namespace"], meta["name"], found.cause, pod)
    return ask
