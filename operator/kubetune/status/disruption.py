"""What is about to stop a running gang, and the newest checkpoint it wrote. Pure.

A running gang is stopped from outside in four ways, each visible on objects the operator already watches:

- a pod of the gang gets the `DisruptionTarget` condition: the API server's Eviction API (`kubectl drain`,
  the cluster autoscaler: reason `EvictionByEvictionAPI`), kube-scheduler's preemption (`PreemptionByScheduler`),
  the taint manager (`DeletionByTaintManager`), the kubelet's node-pressure eviction (`TerminationByKubelet`);
- a pod of the gang is being deleted (`metadata.deletionTimestamp`): `kubectl delete pod`, a drain with
  `--disable-eviction`;
- Kueue evicts or preempts the job's Workload (its `Evicted` condition), or suspends the Job (`spec.suspend`)
  while the pods still run;
- the user suspends the FineTuneJob (`spec.runPolicy.suspend: true`) while its Job still runs: here the
  operator itself stops the pods, so it can wait for the checkpoint first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api import contract
from kubetune.api.models import CheckpointRecord, FineTuneJobSpec
from kubetune.api.names import ANNOTATION_SUSPEND_APPLIED
from kubetune.status.derive import lost_node

DISRUPTION_TARGET = "DisruptionTarget"
"""The pod condition Kubernetes sets before it deletes a pod for a disruption (k8s.io/api/core/v1)."""


@dataclass(frozen=True)
class Disruption:
    """Why the gang is about to stop."""

    cause: str
    """One line for Events, e.g. `pod demo-r0-1-x8k2p: DisruptionTarget EvictionByEvictionAPI (Eviction API: ...)`."""
    held: bool = False
    """The operator stops the pods itself (spec.runPolicy.suspend): it may wait for the checkpoint first."""


def _true(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _live(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Pending", "Running")


def disruption(
    spec: FineTuneJobSpec,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    workload: dict[str, Any] | None,
) -> Disruption | None:
    """What is stopping the running gang of `job` (its `pods`, Kueue's `workload`), or None."""
    if job is None or job["metadata"].get("deletionTimestamp") or not any(_live(p) for p in pods):
        return None
    if any((p.get("status") or {}).get("phase") == "Failed" for p in pods):
        return None  # a rank already failed: the gang cannot checkpoint together; the restart's decision is the reconcile's
    suspended = bool((job.get("spec") or {}).get("suspend"))
    applied = ((job["metadata"].get("annotations") or {}).get(ANNOTATION_SUSPEND_APPLIED)) == "true"
    if suspended and applied:
        return None  # the operator's own suspend: its pods going is what it asked for (after the checkpoint)
    # Kueue's eviction is the cause of what follows it (the Job suspended, its pods deleted): named first
    kueue = _true(workload, "Evicted") if workload is not None else None
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        name = pod["metadata"]["name"]
        if not _live(pod):
            continue
        if lost_node(pod) is not None:
            return (
                None  # lost with its node: its peers cannot checkpoint with it; the gang restarts (NodeLost)
            )
        if kueue is not None:
            continue
        if (cond := _true(pod, DISRUPTION_TARGET)) is not None:
            detail = f" ({cond['message']})" if cond.get("message") else ""
            return Disruption(f"pod {name}: {DISRUPTION_TARGET} {cond.get('reason') or 'Unknown'}{detail}")
        if pod["metadata"].get("deletionTimestamp"):
            return Disruption(f"pod {name} is being deleted")
    if kueue is not None:
        detail = f" ({kueue['message']})" if kueue.get("message") else ""
        return Disruption(f"Kueue evicted the workload: {kueue.get('reason') or 'Evicted'}{detail}")
    if suspended:
        return Disruption("the Job was suspended (by a queue such as Kueue)")
    if spec.run_policy.suspend and not suspended:
        return Disruption("spec.runPolicy.suspend is true", held=True)
    return None


def newest_checkpoint(*found: CheckpointRecord | None) -> CheckpointRecord | None:
    """The checkpoint of the highest step among those known (the status's, a progress read's, a rank's last word)."""
    known = [c for c in found if c is not None]
    return max(known, key=lambda c: (c.step, c.time)) if known else None


def reported_checkpoint(progress: dict[str, Any] | None) -> CheckpointRecord | None:
    """`lastCheckpoint` of a ProgressReport as JSON (a /progress read, or the progress in a termination message)."""
    raw = (progress or {}).get("lastCheckpoint")
    if not isinstance(raw, dict):
        return None
    try:
        return CheckpointRecord.model_validate(raw)
    except ValueError:
        return None


def final_progresses(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The progress each finished rank of the gang left in its termination message (a stopped rank's names the
    checkpoint it wrote on the way out)."""
    found = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (
                (cs.get("state") or {}).get("terminated")
                or (cs.get("lastState") or {}).get("terminated")
                or {}
            )
            message = contract.TerminationMessage.parse(term.get("message"))
            if message is not None and message.progress:
                found.append(message.progress)
    return found
