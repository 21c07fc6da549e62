"""A rank lost with its node (issue 24): Kubernetes evicts the pod once its not-ready/unreachable toleration
runs out, the kubelet never finishes the deletion, and the operator restarts the gang naming the node."""

from __future__ import annotations

from datetime import datetime, timezone

from kubetune.api.models import FineTuneJobStatus
from kubetune.controller.reconcile import observe
from kubetune.status.derive import Observed, decisive_failure, derive, lost_node
from operator_samples import spec

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
TAINT_MANAGER = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "DeletionByTaintManager",
    "message": "Taint manager: deleting due to NoExecute taint",
}


def pod(name, node="n1", restart=0, phase="Running", evicted=None, exit_code=None):
    meta = {
        "name": name,
        "labels": {"kubetune.io/job-name": "demo", "kubetune.io/restart": str(restart)},
        "annotations": {"batch.kubernetes.io/job-completion-index": name.rsplit("-", 1)[-1]},
    }
    status: dict = {"phase": phase, "conditions": []}
    if evicted is not None:
        meta["deletionTimestamp"] = "2025-01-01T11:59:00Z"
        status["conditions"].append(evicted)
    if exit_code is not None:
        term = {"exitCode": exit_code, "finishedAt": "2025-01-01T11:58:00Z", "reason": "Error"}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    return {"metadata": meta, "spec": {"nodeName": node}, "status": status}


def job(name="demo-r0"):
    return {"metadata": {"name": name, "uid": name}, "spec": {}, "status": {}}


def test_a_pod_the_taint_manager_deleted_is_lost_with_its_node():
    assert lost_node(pod("demo-r0-1", node="gpu-7", evicted=TAINT_MANAGER)) == "gpu-7"
    gc = dict(TAINT_MANAGER, reason="DeletionByPodGC")
    assert lost_node(pod("demo-r0-1", node="gpu-7", evicted=gc)) == "gpu-7"


def test_other_deletions_are_not_a_lost_node():
    assert lost_node(pod("demo-r0-1")) is None  # running, not deleted
    deleted = pod("demo-r0-1")
    deleted["metadata"]["deletionTimestamp"] = "2025-01-01T11:59:00Z"  # a restart or suspend deleting it
    assert lost_node(deleted) is None
    preempted = dict(TAINT_MANAGER, reason="PreemptionByScheduler")
    assert lost_node(pod("demo-r0-1", evicted=preempted)) is None
    not_yet = dict(TAINT_MANAGER, status="False")
    assert lost_node(pod("demo-r0-1", evicted=not_yet)) is None


def test_node_loss_restarts_the_gang_and_the_status_and_event_name_the_node():
    pods = [pod("demo-r0-0", node="n1"), pod("demo-r0-1", node="gpu-7", evicted=TAINT_MANAGER)]
    d = derive(spec(), "demo", 1, FineTuneJobStatus(phase="Running"), Observed(job=job(), pods=pods), NOW)
    assert d.action == "restart" and d.status.phase == "Restarting" and d.status.restarts == 1
    lf = d.status.last_failure
    assert lf is not None and lf.pod == "demo-r0-1" and lf.reason == "NodeLost" and lf.exit_code is None
    assert "node gpu-7 lost" in lf.message and "NoExecute" in lf.message
    assert "node gpu-7 lost" in d.status.message
    assert d.event is not None and d.event[:2] == ("Warning", "NodeLost") and "gpu-7" in d.event[2]


def test_the_lost_node_decides_over_the_peer_errors_it_caused():
    """The rank left behind fails too (its collective lost the peer): the cause shown is the node."""
    pods = [
        pod("demo-r0-0", node="n1", phase="Failed", exit_code=1),
        pod("demo-r0-1", node="gpu-7", evicted=TAINT_MANAGER),
    ]
    failure = decisive_failure(pods)
    assert failure is not None and failure.reason == "NodeLost" and failure.pod == "demo-r0-1"


def test_a_user_error_still_decides_over_a_lost_node():
    pods = [
        pod("demo-r0-0", node="n1", phase="Failed", exit_code=65),
        pod("demo-r0-1", node="gpu-7", evicted=TAINT_MANAGER),
    ]
    failure = decisive_failure(pods)
    assert failure is not None and failure.reason == "ModelNotFound"


def test_node_loss_after_the_last_restart_fails_naming_the_node():
    pods = [pod("demo-r2-0", restart=2, node="gpu-7", evicted=TAINT_MANAGER)]
    old = FineTuneJobStatus(phase="Running", restarts=2)
    d = derive(
        spec(runPolicy={"backoffLimit": 2}), "demo", 1, old, Observed(job=job("demo-r2"), pods=pods), NOW
    )
    assert d.status.phase == "Failed" and d.action == "stop"
    assert "node gpu-7 lost" in d.status.message and d.event is not None and d.event[1] == "NodeLost"


def test_the_next_gang_does_not_wait_for_a_pod_lost_with_its_node():
    """Its kubelet is gone: the pod stays Terminating until the node comes back or is deleted."""
    lost = pod("demo-r0-1", node="gpu-7", evicted=TAINT_MANAGER)
    leaving = pod("demo-r0-0", node="n1")
    leaving["metadata"]["deletionTimestamp"] = "2025-01-01T11:59:30Z"  # the restart deleting it: waited for
    assert observe("demo", 1, [], [lost, leaving], None).stale == 1
    assert observe("demo", 1, [], [lost], None).stale == 0
