"""A checkpoint before any eviction, on the real node. One 2-rank job with no scheduled checkpoint (checkpointSteps
past maxSteps), so every checkpoint in S3 was written because its pods were being stopped.

Rank 1 is evicted through the Eviction API (what `kubectl drain`, the cluster autoscaler and a descheduler use):
the gang writes a checkpoint at or after the step the status showed when the eviction was sent, and the
restarted gang resumes from it. (`kubectl drain` of the node - every rank evicted at once - is not tested here yet: since the gang restart in
place, a gang evicted whole comes back without a new restart generation, which the drain stage's wait assumed.)

status.lastCheckpoint names each checkpoint; the operator's Events say what it noticed."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import pytest
from conftest import checkpoints, job_doc, wait_for
from harness.mode import NODE_MODE

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE_MODE != "kubelet", reason="needs the real node (the kubelet's SIGTERM, grace period and cordon)"
    ),
]
NS_KEY = "faults"


def gang(kctl: Any, ns: str, name: str) -> list[dict[str, Any]]:
    pods = kctl.get(ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def running_gang(kctl: Any, ns: str, name: str, restarts: int) -> list[dict[str, Any]]:
    pods = [
        p for p in gang(kctl, ns, name) if p["metadata"]["labels"].get("kubetune.io/restart") == str(restarts)
    ]
    return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else []


def step(kctl: Any, ns: str, name: str) -> int:
    return int((kctl.status(ns, name).get("progress") or {}).get("step") or 0)


def resumed_from(node: Any, ns: str, pods: list[dict[str, Any]]) -> int | None:
    rank0 = next(
        p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    )
    found = re.search(r"resumed from checkpoint step (\d+)", node.logs(ns, rank0["metadata"]["name"]))
    return int(found.group(1)) if found else None


def stopped(
    kctl: Any, s3: Any, ns: str, name: str, restarts: int, node: Any, since: float, how: str
) -> dict[str, Any]:
    """Wait for the next gang to train, then what it resumed from and what the status says."""
    wait_for(
        f"gang {restarts} running after the {how}", lambda: running_gang(kctl, ns, name, restarts), 300, 1
    )
    pods = running_gang(kctl, ns, name, restarts)
    wait_for("it resumed", lambda: resumed_from(node, ns, pods) is not None, 180, 1)
    return {"resumed": resumed_from(node, ns, pods), "took": time.monotonic() - since,
            "status": kctl.status(ns, name), "s3": checkpoints(s3, name)}  # fmt: skip


def test_an_evicted_rank_resumes_from_a_checkpoint_taken_after_the_eviction_began(
    cluster, kctl, suite_ns, s3, s3_data, node, operator
):
    name = "evict-drain"
    # The floor grace period (30 s): the checkpoint is written within seconds of the eviction; an evicted pod that
    # lingers after it (seen once in four runs: its trainer wrote the checkpoint and then did not exit, the pod
    # Terminating for the whole default 300 s) is then killed in 30 s instead of holding the restart for 5 minutes.
    doc = job_doc(name, s3, s3_data, steps=100000, checkpoint_steps=1000000,
                  **{"runPolicy.backoffLimit": 3, "terminationGracePeriodSeconds": 30})  # fmt: skip
    kctl.apply(suite_ns, doc)
    started = time.monotonic()
    wait_for("training under way", lambda: step(kctl, suite_ns, name) >= 8, 240, 0.5)

    # 1. The Eviction API on rank 1 (policy/v1 Eviction: DisruptionTarget, then a delete with the grace period).
    victim = next(p for p in running_gang(kctl, suite_ns, name, 0)
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")  # fmt: skip
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": victim["metadata"]["name"], "namespace": suite_ns},
    }
    at_eviction, t_evict = step(kctl, suite_ns, name), time.monotonic()
    assert not checkpoints(
        s3, name
    )  # none scheduled: each one below was written because the pods were stopped
    kctl("create", "--raw", f"/api/v1/namespaces/{suite_ns}/pods/{victim['metadata']['name']}/eviction", "-f", "-",
         input=json.dumps(eviction))  # fmt: skip
    first = stopped(kctl, s3, suite_ns, name, 1, node, t_evict, "eviction")
    assert first["resumed"] >= at_eviction, (first, at_eviction)
    assert first["status"]["lastCheckpoint"]["step"] >= first["resumed"], first["status"]
    assert first["s3"] and min(first["s3"]) >= at_eviction, first["s3"]

    # The job is long: the suite's clean-up deletes it (training to the end would only add minutes).
    status = kctl.status(suite_ns, name)
    events = kctl.get(suite_ns, "events", None, f"--field-selector=involvedObject.name={name}") or []
    said = [(e["reason"], e["message"]) for e in events if e["reason"].startswith("Checkpoint")]
    print(f"\n[suite] {name}: eviction at step {at_eviction} -> resumed {first['resumed']} ({first['took']:.0f}s); "
          f"checkpoints {checkpoints(s3, name)}; whole test {time.monotonic() - started:.0f}s; events {said}", file=sys.stderr)  # fmt: skip
    # the restart resumed from the newest checkpoint (a request and a SIGTERM reaching the ranks at two steps write two)
    assert status["restarts"] == 1 and first["resumed"] == max(checkpoints(s3, name)), (
        status,
        checkpoints(s3, name),
    )
