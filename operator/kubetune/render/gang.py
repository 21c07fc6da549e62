"""spec.scheduling.gang -> the gang scheduler's PodGroup and what the pods carry to join it. Pure.

One PodGroup per FineTuneJob, named after it and owned by it; it outlives gang restarts (each restart's pods
join the same group). What each scheduler reads (checked against each project's CRD in e2e/crds/):

| scheduler | PodGroup | pods |
|---|---|---|
| coscheduling (scheduler-plugins) | scheduling.x-k8s.io/v1alpha1: minMember, minResources, scheduleTimeoutSeconds | label `scheduling.x-k8s.io/pod-group` |
| volcano | scheduling.volcano.sh/v1beta1: minMember, minResources, queue, priorityClassName | annotation `scheduling.k8s.io/group-name` |
| kai | scheduling.run.ai/v2alpha2: minMember, queue, priorityClassName | annotation `pod-group-name`, label `kai.scheduler/queue` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubetune.api.models import FineTuneJobSpec, GangSpec
from kubetune.api.names import standard_labels
from kubetune.api.schedulers import (
    COSCHEDULING_LABEL,
    FLAVORS,
    KAI_ANNOTATION,
    KAI_QUEUE_LABEL,
    VOLCANO_ANNOTATION,
)

__all__ = ["COSCHEDULING_LABEL", "FLAVORS", "KAI_ANNOTATION", "KAI_QUEUE_LABEL", "VOLCANO_ANNOTATION"]


def gang_of(spec: FineTuneJobSpec) -> GangSpec | None:
    return spec.scheduling.gang if spec.scheduling is not None else None


def pod_group_name(name: str) -> str:
    return name


def min_member(spec: FineTuneJobSpec) -> int:
    """Pods that must be placeable together: spec.scheduling.gang.minMember, else the whole gang, or the smallest
    an elastic gang may shrink to (distributed.minNodes): the PodGroup is the job's, for every gang size."""
    gang, d = gang_of(spec), spec.distributed
    if gang is not None and gang.min_member is not None:
        return gang.min_member
    return d.min_nodes if d.elastic and d.min_nodes is not None else d.nodes


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)$")


def scale_quantity(quantity: str, times: int) -> str:
    """`quantity` x `times`, in the same unit ("100m" x 3 = "300m", "1Gi" x 2 = "2Gi", "1e3" x 2 = "2e3")."""
    m = _QUANTITY.match(str(quantity).strip())
    if m is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number = Decimal(m.group(1)) * times
    text = format(number.normalize(), "f") if number != number.to_integral() else str(int(number))
    return f"{text}{m.group(2)}"


def min_resources(spec: FineTuneJobSpec, requests: dict[str, Any]) -> dict[str, str]:
    """What `min_member` pods request together (per-pod `requests`, the container's, GPUs included)."""
    n = min_member(spec)
    return {k: scale_quantity(str(v), n) for k, v in sorted(requests.items())}


def render_pod_group(
    spec: FineTuneJobSpec, name: str, namespace: str, requests: dict[str, Any]
) -> dict[str, Any] | None:
    """The PodGroup for the job's gang, or None without spec.scheduling.gang."""
    gang = gang_of(spec)
    if gang is None:
        return None
    flavor = FLAVORS[gang.scheduler]
    body: dict[str, Any] = {"minMember": min_member(spec)}
    if gang.scheduler == "coscheduling":
        body["minResources"] = min_resources(spec, requests)
        if gang.schedule_timeout_seconds is not None:
            body["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    elif gang.scheduler == "volcano":
        body["minResources"] = min_resources(spec, requests)
        if gang.queue:
            body["queue"] = gang.queue
        if spec.priority_class_name:
            body["priorityClassName"] = spec.priority_class_name
    else:  # kai
        body["queue"] = gang.queue
        if spec.priority_class_name:
            body["priorityClassName"] = spec.priority_class_name
    return {
        "apiVersion": flavor.api_version,
        "kind": "PodGroup",
        "metadata": {
            "name": pod_group_name(name),
            "namespace": namespace,
            "labels": standard_labels(name, "gang"),
        },
        "spec": body,
    }


@dataclass(frozen=True)
class PodMembership:
    """What each pod of the gang carries to join its PodGroup."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    scheduler_name: str | None = None


def pod_membership(spec: FineTuneJobSpec, name: str) -> PodMembership:
    gang = gang_of(spec)
    if gang is None:
        return PodMembership()
    group = pod_group_name(name)
    scheduler = spec.scheduler_name or FLAVORS[gang.scheduler].scheduler_name
    if gang.scheduler == "coscheduling":
        return PodMembership(labels={COSCHEDULING_LABEL: group}, scheduler_name=scheduler)
    if gang.scheduler == "volcano":
        return PodMembership(annotations={VOLCANO_ANNOTATION: group}, scheduler_name=scheduler)
    return PodMembership(
        labels={KAI_QUEUE_LABEL: gang.queue or ""},
        annotations={KAI_ANNOTATION: group},
        scheduler_name=scheduler,
    )
