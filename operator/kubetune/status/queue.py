"""Kueue's view of a job's gang: queued or admitted, and Kueue's own words for why. Pure.

Kueue admits the workload Job (its batch/Job integration): it keeps the Job suspended until the ClusterQueue
has quota for every pod, then unsuspends it. Why it waits is written on its Workload (kueue.x-k8s.io/v1beta2),
not on the Job: the QuotaReserved condition's message, e.g. "couldn't assign flavors to pod set main:
insufficient unused quota for cpu in flavor default, 100m more needed". The operator watches Workloads and
surfaces that message in the FineTuneJob's status and its Admitted condition.

A Workload Kueue evicts (a higher-priority Workload preempted it: reason `Preempted`) keeps `Evicted=True` from
the eviction until Kueue admits it again; meanwhile Kueue suspends the Job (its pods checkpoint and stop), and the
job is Pending with reason EvictedByKueue in Kueue's words (status/derive.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kubetune.api.names import LABEL_QUEUE

NO_WORKLOAD = "no Kueue Workload for it yet (is Kueue running, with a LocalQueue of this name?)"
WAITING = "waiting in the queue"
"""A Workload Kueue has not yet tried to admit (no QuotaReserved message yet)."""


@dataclass(frozen=True)
class QueueState:
    queue: str
    """The LocalQueue (the Job's kueue.x-k8s.io/queue-name)."""
    workload: str | None
    """Kueue's Workload for the Job, once Kueue has made one."""
    admitted: bool
    cluster_queue: str | None
    """The ClusterQueue that admitted it."""
    message: str
    """Kueue's own words: why it waits, or what admitted it."""
    evicted: str | None = None
    """Kueue's eviction message (preempted, deactivated, ...) while the Workload is evicted."""
    evicted_reason: str | None = None
    """Kueue's reason for that eviction: `Preempted`, `PodsReadyTimeout`, `InactiveWorkload`, ... (Kueue keeps the
    Workload's Evicted condition True from the eviction until it admits the Workload again)."""


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def held_words(state: QueueState, shown: str | None, template: str) -> QueueState:
    """Kueue's words for a wait that goes on, as first shown: Kueue rewrites its QuotaReserved message as the queue
    moves (the quota it is short by, the podsets it considered), and following every rewrite cost each queued job a
    status write per change (bench/kueue_scale.py: two or three while it waited). The words change when the wait
    changes: no Workload -> Kueue's reason, admitted, evicted. `shown` is the Admitted condition's message as
    written, `template` its form with an empty reason."""
    if (
        state.admitted
        or state.workload is None
        or state.evicted is not None
        or not shown
        or not shown.startswith(template)
    ):
        return state
    words = shown[len(template) :]
    if not words or words in (NO_WORKLOAD, WAITING):  # not yet Kueue's own reason: take the new words
        return state
    return replace(state, message=words)


def queue_state(job: dict[str, Any] | None, workload: dict[str, Any] | None) -> QueueState | None:
    """The queue state of a Job that carries Kueue's queue label; None for a Job no queue manages."""
    if job is None:
        return None
    queue = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_QUEUE)
    if not queue:
        return None
    if workload is None:
        return QueueState(queue, None, False, None, NO_WORKLOAD)
    name = (workload.get("metadata") or {}).get("name")
    admission = (workload.get("status") or {}).get("admission") or {}
    admitted = (_condition(workload, "Admitted") or {}).get("status") == "True"
    reserved = _condition(workload, "QuotaReserved") or {}
    evicted = _condition(workload, "Evicted") or {}
    active = evicted.get("status") == "True"
    eviction = (evicted.get("message") or "") if active else None
    why = (evicted.get("reason") or "Evicted") if active else None
    if admitted:
        cq = admission.get("clusterQueue")
        words = reserved.get("message") or f"Quota reserved in ClusterQueue {cq}"
        return QueueState(queue, name, True, cq, words, eviction, why)
    message = reserved.get("message") or (_condition(workload, "Admitted") or {}).get("message") or WAITING
    return QueueState(queue, name, False, admission.get("clusterQueue"), message, eviction, why)
