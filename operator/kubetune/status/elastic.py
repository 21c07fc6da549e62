"""Elastic resume on the operator's side (spec.distributed.minNodes): when a gang restarts on fewer nodes.

A gang whose pods have not all been placed for `elasticWaitSeconds` (a node lost and not back, or too few nodes
free) restarts from its newest complete checkpoint on the nodes that did place its other pods, rounded down to a
node count at which the global batch divides (kubetune.api.elastic), if that is at least minNodes. Each restart
for another cause (a failed rank, an evicted pod) starts the whole gang again: it grows back when the nodes have
returned, and shrinks again after the wait when they have not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubetune.api import elastic
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.names import ANNOTATION_RELEASED


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def gang_nodes(spec: FineTuneJobSpec, recorded: int | None) -> int:
    """The nodes the current gang trains on: the recorded shrink of an elastic job, else all of them."""
    if spec.distributed.elastic and recorded is not None and recorded in elastic.node_counts(spec):
        return recorded
    return spec.distributed.nodes


def unplaced_since(pod: dict[str, Any]) -> datetime | None:
    """Since when a pod without a node has waited: since the operator released it (ANNOTATION_RELEASED: a pod
    waits behind the gang gate, PodScheduled=False SchedulingGated, until the earlier generation is gone), else
    its PodScheduled=False condition, else its creation."""
    released = parse_time((pod["metadata"].get("annotations") or {}).get(ANNOTATION_RELEASED))
    if released is not None:
        return released
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return parse_time(cond.get("lastTransitionTime")) or parse_time(
                pod["metadata"].get("creationTimestamp")
            )
    return parse_time(pod["metadata"].get("creationTimestamp"))


def waiting(pods: list[dict[str, Any]]) -> list[datetime]:
    """Since when each live pod of the gang without a node has waited."""
    out = []
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            continue
        if (since := unplaced_since(pod)) is not None:
            out.append(since)
    return out


def shrink_to(spec: FineTuneJobSpec, nodes: int, pods: list[dict[str, Any]], now: datetime) -> int | None:
    """The smaller node count the gang of `nodes` restarts at, or None: no pod waited out elasticWaitSeconds, or
    the placed pods are fewer than minNodes (the gang keeps waiting)."""
    if not spec.distributed.elastic:
        return None
    since = waiting(pods)
    if not since or (now - min(since)).total_seconds() < spec.distributed.elastic_wait_seconds:
        return None
    placed = sum(1 for p in pods if (p.get("spec") or {}).get("nodeName"))
    smaller = elastic.nodes_for(spec, min(placed, nodes - 1))
    return smaller if smaller is not None and smaller < nodes else None


def wake_in(spec: FineTuneJobSpec, pods: list[dict[str, Any]], now: datetime) -> float | None:
    """Seconds until the oldest unplaced pod has waited elasticWaitSeconds (no watch event marks that moment)."""
    since = waiting(pods) if spec.distributed.elastic else []
    if not since:
        return None
    return spec.distributed.elastic_wait_seconds - (now - min(since)).total_seconds() + 0.5
