"""A real gang scheduler: scheduler-plugins' Coscheduling (v0.32.7, built from its Go module:
harness/coscheduling.py) beside the node's kube-scheduler. Two 2-pod FineTuneJobs with spec.scheduling.gang on a
node with CPU for one gang and a half: while the first trains, no pod of the second is bound (the default
scheduler would bind one of its two pods, a half-started gang holding resources); the second starts once the
first has finished. Meanwhile a third gang whose pods can never fit (each asks more CPU than the node has) and
whose scheduleTimeoutSeconds is 5 turns Unschedulable in status with the scheduler's own words and a Warning, and
keeps its one Job (same uid, same pods, no restart) until the second gang has finished."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Kctl, job_doc, wait_for
from harness import binaries
from harness.coscheduling import SCHEDULER_NAME, Coscheduling
from harness.mode import NODE_MODE

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(NODE_MODE != "kubelet", reason="needs the real node (the agent binds pods itself)")]  # fmt: skip
NS_KEY = "queue"


@pytest.fixture(scope="module")
def coscheduling(cluster: Any, e2e_workdir: Path) -> Iterator[Coscheduling]:
    try:
        binaries.ensure("coscheduling")
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))
    with Coscheduling(cluster, e2e_workdir / "coscheduling") as gang:
        yield gang


def millicores(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def free_cpu(kctl: Kctl, node: str) -> int:
    """The node's allocatable CPU less what the pods bound to it request (millicores)."""
    alloc = millicores(
        json.loads(kctl("get", "node", node, "-o", "json").stdout)["status"]["allocatable"]["cpu"]
    )
    used = 0
    pods = json.loads(
        kctl("get", "pods", "-A", f"--field-selector=spec.nodeName={node}", "-o", "json").stdout
    )["items"]
    for pod in pods:
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        for c in pod["spec"]["containers"]:
            used += millicores(((c.get("resources") or {}).get("requests") or {}).get("cpu", "0"))
    return alloc - used


def bound(kctl: Kctl, ns: str, name: str) -> list[str]:
    return [p["metadata"]["name"] for p in kctl.get(ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []
            if p["spec"].get("nodeName")]  # fmt: skip


def unschedulable(kctl: Kctl, ns: str, name: str) -> dict[str, Any] | None:
    """The job's state once its status is Unschedulable in the words of the scheduler (the PodScheduled=False
    message of one of its unbound pods): its message, its Jobs' uids, its pods' uids and restarts. None before."""
    status = kctl.status(ns, name)
    running = next((c for c in status.get("conditions") or [] if c["type"] == "Running"), {})
    state = (status.get("phase"), running.get("status"), running.get("reason"))
    if state != ("Pending", "False", "Unschedulable"):
        return None
    pods = kctl.get(ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []
    words = [c["message"] for p in pods for c in p["status"].get("conditions") or []
             if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("message")]  # fmt: skip
    if not any(w in status["message"] for w in words):
        return None
    jobs = kctl.get(ns, "jobs", None, f"-l=kubetune.io/job-name={name}") or []
    return {"message": status["message"], "jobs": [j["metadata"]["uid"] for j in jobs],
            "pods": sorted(p["metadata"]["uid"] for p in pods), "restarts": status.get("restarts", 0)}  # fmt: skip


def test_no_pod_of_a_gang_is_bound_until_the_whole_gang_fits(
    coscheduling, cluster, kctl, suite_ns, s3, s3_data, node
):
    free = free_cpu(kctl, node.name)
    per_pod = free * 3 // 10  # one gang takes 60% of what is free; a second gang's pod would fit
    assert per_pod >= 100, f"too little free CPU on the node for the test ({per_pod}m per pod)"
    gang = {"scheduler": "coscheduling", "scheduleTimeoutSeconds": 60}
    docs = {}
    for name, steps in (("gang-first", 40), ("gang-second", 5)):
        doc = job_doc(name, s3, s3_data, steps=steps, checkpoint_steps=steps, scheduling={"gang": gang})
        doc["spec"]["resources"] = {"requests": {"cpu": f"{per_pod}m", "memory": "256Mi"}}
        docs[name] = doc
    never = job_doc("gang-never", s3, s3_data, steps=5, checkpoint_steps=5,
                    scheduling={"gang": {"scheduler": "coscheduling", "scheduleTimeoutSeconds": 5}})  # fmt: skip
    never["spec"]["resources"] = {"requests": {"cpu": f"{free + 1000}m", "memory": "256Mi"}}  # fmt: skip
    kctl.apply(suite_ns, docs["gang-first"])
    wait_for("first gang bound", lambda: len(bound(kctl, suite_ns, "gang-first")) == 2, 180, 1)
    template = kctl.get(suite_ns, "jobs", "gang-first-r0")["spec"]["template"]
    assert template["spec"]["schedulerName"] == SCHEDULER_NAME
    kctl.apply(suite_ns, docs["gang-second"])
    kctl.apply(suite_ns, never)
    wait_for("second gang's pods created", lambda: len(kctl.get(suite_ns, "pods", None, "-l=kubetune.io/job-name=gang-second") or []) == 2,
             120, 1)  # fmt: skip
    seen_running, stuck = False, None
    while kctl.phase(suite_ns, "gang-first") not in ("Succeeded", "Failed"):
        assert bound(kctl, suite_ns, "gang-second") == [], (
            "a pod of the second gang was bound while the first held the node"
        )
        seen_running = seen_running or kctl.phase(suite_ns, "gang-first") == "Running"
        if stuck is None and (stuck := unschedulable(kctl, suite_ns, "gang-never")) is not None:
            stuck_at = time.monotonic()
        time.sleep(1)
    assert kctl.phase(suite_ns, "gang-first") == "Succeeded"
    assert seen_running
    done = time.monotonic()
    print(f"[gang] first gang done; {per_pod}m per pod", file=sys.stderr)
    wait_for("second Succeeded", lambda: kctl.phase(suite_ns, "gang-second") == "Succeeded", 600, 1)
    print(f"[gang] second gang Succeeded {time.monotonic() - done:.0f} s after the first", file=sys.stderr)

    # The gang that cannot fit: Unschedulable (5 s after its release) in the scheduler's words, with a Warning...
    if stuck is None:
        stuck = wait_for("never-fitting gang Unschedulable", lambda: unschedulable(kctl, suite_ns, "gang-never"), 60, 1)  # fmt: skip
        stuck_at = time.monotonic()
    print(f"[gang] never-fitting gang: {stuck['message']}", file=sys.stderr)
    assert "0/1 nodes are available" in stuck["message"] and "scheduleTimeoutSeconds (5s)" in stuck["message"]
    assert len(stuck["jobs"]) == 1 and len(stuck["pods"]) == 2 and stuck["restarts"] == 0, stuck
    events = kctl.get(suite_ns, "events", None, "--field-selector=involvedObject.kind=FineTuneJob,involvedObject.name=gang-never,reason=Unschedulable")  # fmt: skip
    assert [e["type"] for e in events] == ["Warning"], events
    # ... and nothing made again since (the second gang's whole run): the same Job, the same two pods, unbound.
    time.sleep(max(0.0, 20 - (time.monotonic() - stuck_at)))
    now = unschedulable(kctl, suite_ns, "gang-never")
    assert now is not None and bound(kctl, suite_ns, "gang-never") == []
    held = ("jobs", "pods", "restarts")
    assert [now[k] for k in held] == [stuck[k] for k in held], (stuck, now)
    print(f"[gang] never-fitting gang unchanged for {time.monotonic() - stuck_at:.0f} s", file=sys.stderr)
