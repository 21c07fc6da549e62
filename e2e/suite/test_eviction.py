"""A checkpoint before any eviction, on the real node. Each job has no scheduled checkpoint (checkpointSteps past
maxSteps), so every checkpoint in S3 was written because its pods were being stopped.

1. Rank 1 is evicted through the Eviction API (what `kubectl drain`, the cluster autoscaler and a descheduler use):
   the gang writes a checkpoint at or after the step the status showed when the eviction was sent, and the
   restarted gang resumes from it.
2. `kubectl drain` of the node (cordon, then every rank evicted at once), then `kubectl uncordon`: the gang waits
   while the node is cordoned, comes back in the same Job once it is uncordoned, resumes from a checkpoint taken
   after the drain began, and the job succeeds. Its wait keys on the pods' UIDs, not on a restart generation (a
   gang evicted whole may come back as the same generation: the restart in place counts it or not depending on
   whether the operator saw one rank go while its peer still ran).

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

    # The job is long: deleted here (training to the end would only add minutes; the drain test should not share
    # the node's CPUs with it).
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
    kctl("delete", "finetunejob", name, "-n", suite_ns, "--wait=false")


def new_gang(kctl: Any, ns: str, name: str, old: set[str]) -> list[dict[str, Any]]:
    """The job's two pods that are not among `old` (UIDs), once both are released and Running."""
    pods = [p for p in gang(kctl, ns, name) if p["metadata"]["uid"] not in old]
    ok = len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
    return pods if ok else []


def released_unbound(kctl: Any, ns: str, name: str, old: set[str]) -> list[dict[str, Any]]:
    """The replacement pods once the operator has released them (no scheduling gate), bound or not."""
    pods = [p for p in gang(kctl, ns, name) if p["metadata"]["uid"] not in old]
    return pods if len(pods) == 2 and not any(p["spec"].get("schedulingGates") for p in pods) else []


def test_a_drained_node_s_gang_resumes_from_a_checkpoint_taken_after_the_drain_began(
    cluster, kctl, suite_ns, s3, s3_data, node, operator
):
    """Single node: `kubectl drain` evicts both ranks at once, as a maintenance drain does, and the gang can only
    come back after `kubectl uncordon` (a second node would let it move, but costs a node start for the same
    check: the Eviction API, the checkpoint, the release of the same Job's new pods). The drain selects the job's
    pods (the suite's operator and CoreDNS run on this one node and must stay)."""
    name = "drain"
    # 120 tiny steps: the drain is sent once the status shows step 2; the tiny model's pace varies with the
    # machine's load (about 1 step/s with load 11 on 2 cores, 10/s on a quiet one), and the checkpoint lands
    # within a few seconds of the drain: mid-run at either pace, and the rest is about a minute at the slow one.
    doc = job_doc(name, s3, s3_data, steps=120, checkpoint_steps=1000000,
                  **{"runPolicy.backoffLimit": 3, "terminationGracePeriodSeconds": 30})  # fmt: skip
    kctl.apply(suite_ns, doc)
    started = time.monotonic()
    wait_for("training under way", lambda: step(kctl, suite_ns, name) >= 2, 240, 0.5)
    (job,) = kctl.get(suite_ns, "jobs", None, f"-l=kubetune.io/job-name={name}")
    old = {p["metadata"]["uid"] for p in gang(kctl, suite_ns, name)}
    assert len(old) == 2 and not checkpoints(s3, name), (old, checkpoints(s3, name))

    at_drain, t_drain = step(kctl, suite_ns, name), time.monotonic()
    try:
        drained = kctl("drain", node.name, f"--pod-selector=kubetune.io/job-name={name}", "--delete-emptydir-data",
                       "--ignore-daemonsets", "--timeout=120s", check=False)  # fmt: skip
        drain_took = time.monotonic() - t_drain
        assert drained.returncode == 0, drained.stdout + drained.stderr
        # the next gang is released by the operator, and stays unbound while the node is cordoned
        waiting = wait_for(
            "the next gang released", lambda: released_unbound(kctl, suite_ns, name, old), 120, 0.5
        )
        assert all(not p["spec"].get("nodeName") for p in waiting), waiting
    finally:
        kctl("uncordon", node.name)
    pods = wait_for(
        "the gang running after the uncordon", lambda: new_gang(kctl, suite_ns, name, old), 240, 0.5
    )
    back = time.monotonic() - t_drain
    wait_for("it resumed", lambda: resumed_from(node, suite_ns, pods) is not None, 180, 1)
    resumed = resumed_from(node, suite_ns, pods)
    wait_for("the job finished", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 300, 1)

    status = kctl.status(suite_ns, name)
    events = kctl.get(suite_ns, "events", None, f"--field-selector=involvedObject.name={name}") or []
    said = [(e["reason"], e["message"]) for e in events if e["reason"].startswith("Checkpoint")]
    written = checkpoints(s3, name)
    # torchrun logs this when a rank it sent SIGTERM had not exited 30 s later (the lingering exit looked into)
    sigkilled = "forcefully exiting via 9" in node.pod_logs(suite_ns, f"{name}-")
    print(f"\n[suite] {name}: drain at step {at_drain} (kubectl drain {drain_took:.0f}s) -> resumed {resumed} "
          f"(gang back {back:.0f}s after the drain began); checkpoints {written}; restarts {status.get('restarts')}; "
          f"whole test {time.monotonic() - started:.0f}s; torchrun had to SIGKILL a rank: {sigkilled}; "
          f"events {said}", file=sys.stderr)  # fmt: skip
    assert status["phase"] == "Succeeded", status
    # every checkpoint was written because of the drain, at or after the step shown when it began
    assert written and min(written) >= at_drain and resumed == max(written), (at_drain, written, resumed)
    assert status["lastCheckpoint"]["step"] >= resumed, status["lastCheckpoint"]
    asked = [m for r, m in said if r == "CheckpointRequested"]
    assert asked and all("EvictionByEvictionAPI" in m for m in asked), said
    done = [m for r, m in said if r == "CheckpointWritten"]
    assert any("EvictionByEvictionAPI" in m and f"step {s} " in m for m in done for s in written), said
    # the same Job throughout (restarted in place), no other
    jobs = kctl.get(suite_ns, "jobs", None, f"-l=kubetune.io/job-name={name}")
    assert [j["metadata"]["uid"] for j in jobs] == [job["metadata"]["uid"]], jobs
