"""Shared clusters with a real Kueue (v0.17.0, built from its Go module: harness/kueue.py): a ClusterQueue with
room for one of two FineTuneJobs; the second waits Pending with Kueue's own message in its status
(Admitted=False, QueuedByKueue) and starts when the first has finished. Its Workload carries the priority of
the FineTuneJob's kueue.x-k8s.io/priority-class label."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, Kctl, checkpoints, job_doc, wait_for
from harness import binaries
from harness.cluster import KUBECTL
from harness.kueue import Kueue

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "queue"
QUEUE = "team-a"
CLUSTER_QUEUE = "kts-cq"


def queues(ns: str) -> str:
    """A flavor, a ClusterQueue with room for one 2-pod job (cpu 300m: each job asks 2 x 100m) and 8 GPUs,
    a LocalQueue in the job's namespace, and a low WorkloadPriorityClass."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
             "flavors": [{"name": "default", "resources": [
                 {"name": "cpu", "nominalQuota": "300m"}, {"name": "memory", "nominalQuota": "8Gi"},
                 {"name": "ephemeral-storage", "nominalQuota": "1Ti"}, {"name": "nvidia.com/gpu", "nominalQuota": 8}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": QUEUE, "namespace": ns},
         "spec": {"clusterQueue": CLUSTER_QUEUE}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": "low"},
         "value": 10, "description": "batch fine-tuning"},
    ]  # fmt: skip
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def kueue(cluster: Any, kctl: Kctl, operator: Any, e2e_workdir: Path) -> Iterator[Kueue]:
    try:
        binaries.ensure("kueue")
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))
    with Kueue(cluster, e2e_workdir / "kueue") as k:
        # The operator finds Kueue's Workload API when it starts (it does not watch CRDs cluster-wide under the
        # chart's namespaced RBAC): a cluster that installs Kueue after kubetune restarts the operator once.
        t0 = time.monotonic()
        operator.restart()
        print(f"\n[kueue] operator restarted in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield k
        errors = k.errors()
    assert not errors, "Kueue logged errors:\n" + "\n".join(errors[:20])


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_second_job_waits_in_kueues_words_and_starts_when_the_first_finishes(
    kueue, cluster, kctl, suite_ns, s3, s3_data, node
):
    cluster.apply(queues(suite_ns))
    labels = {"kueue.x-k8s.io/queue-name": QUEUE}
    first = job_doc("queued-first", s3, s3_data, steps=30, checkpoint_steps=15)
    first["metadata"]["labels"] = labels
    second = job_doc("queued-second", s3, s3_data, steps=10, checkpoint_steps=10)
    second["metadata"]["labels"] = {**labels, "kueue.x-k8s.io/priority-class": "low"}
    kctl.apply(suite_ns, first)
    wait_for(
        "first admitted",
        lambda: condition(kctl.status(suite_ns, "queued-first"), "Admitted").get("status") == "True",
        120,
        1,
    )
    kctl.apply(suite_ns, second)

    def queued() -> bool:
        status = kctl.status(suite_ns, "queued-second")
        return (
            status.get("phase") == "Pending"
            and condition(status, "Admitted").get("reason") == "QueuedByKueue"
            and "insufficient unused quota" in condition(status, "Admitted").get("message", "")
        )

    wait_for("second Pending, QueuedByKueue with Kueue's message", queued, 120, 1)
    status = kctl.status(suite_ns, "queued-second")
    print(f"[kueue] second job: {status['message']}", file=sys.stderr)
    assert "Queued by Kueue in LocalQueue team-a" in status["message"]
    admitted = condition(kctl.status(suite_ns, "queued-first"), "Admitted")
    assert CLUSTER_QUEUE in admitted["message"]
    [workload] = [
        w
        for w in kueue.workloads(suite_ns)
        if w["metadata"]["ownerReferences"][0]["name"] == "queued-second-r0"
    ]
    assert workload["spec"]["priority"] == 10  # the FineTuneJob's kueue.x-k8s.io/priority-class reached Kueue

    # The second gang holds nothing while it waits: its Job stays suspended, no pod exists.
    assert kctl.get(suite_ns, "jobs", "queued-second-r0")["spec"]["suspend"] is True
    assert kctl.get(suite_ns, "pods", None, "-l=kubetune.io/job-name=queued-second") == []

    wait_for("first Succeeded", lambda: kctl.phase(suite_ns, "queued-first") == "Succeeded", 600, 2)
    done_first = kctl.status(suite_ns, "queued-first")["completionTime"]
    wait_for("second admitted", lambda: condition(kctl.status(suite_ns, "queued-second"), "Admitted").get("status") == "True",
             120, 1)  # fmt: skip
    wait_for("second Succeeded", lambda: kctl.phase(suite_ns, "queued-second") == "Succeeded", 600, 2)
    second_status = kctl.status(suite_ns, "queued-second")
    assert second_status["startTime"] >= done_first, (second_status["startTime"], done_first)
    print(
        f"[kueue] first finished {done_first}, second started {second_status['startTime']}", file=sys.stderr
    )


def test_a_gang_restart_keeps_its_place_in_the_queue(kueue, cluster, kctl, suite_ns, s3, s3_data, node):
    """A admitted and training; B arrives and waits for A's quota; a rank of A dies. A's restarted gang must run
    before B (A was first in line and only lost a pod): the gang restarts in place, in the same Job, so Kueue's
    Workload stays the same one and stays admitted. (Before, each restart was a new Job, i.e. a new Workload,
    younger than B's: B took the quota and A waited for all of B.) The restart's time, from the kill to the next
    generation released, is printed."""
    cluster.apply(queues(suite_ns))
    labels = {"kueue.x-k8s.io/queue-name": QUEUE}
    a = job_doc("restart-a", s3, s3_data, steps=400, checkpoint_steps=5, **{"runPolicy.backoffLimit": 2})
    a["metadata"]["labels"] = labels
    b = job_doc("restart-b", s3, s3_data, steps=10, checkpoint_steps=10)
    b["metadata"]["labels"] = labels
    kctl.apply(suite_ns, a)
    wait_for("A training", lambda: kctl.phase(suite_ns, "restart-a") == "Running", 300, 1)
    kctl.apply(suite_ns, b)
    wait_for(
        "B queued",
        lambda: condition(kctl.status(suite_ns, "restart-b"), "Admitted").get("reason") == "QueuedByKueue",
        120,
        1,
    )

    def workload_of(job: str) -> dict[str, Any] | None:
        return next(
            (w for w in kueue.workloads(suite_ns) if w["metadata"]["ownerReferences"][0]["name"] == job), None
        )

    before = workload_of("restart-a-r0")
    assert before is not None
    victim = next(p for p in kctl.get(suite_ns, "pods", None, "-l=kubetune.io/job-name=restart-a,kubetune.io/restart=0")
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")  # fmt: skip
    killed = time.monotonic()
    node.kill_container(suite_ns, victim["metadata"]["name"])
    wait_for("A restarted", lambda: kctl.status(suite_ns, "restart-a").get("restarts") == 1, 180, 1)

    def a_released() -> bool:  # A's next gang: both ranks' pods released (its gang gate lifted)
        ps = kctl.get(suite_ns, "pods", None, "-l=kubetune.io/job-name=restart-a,kubetune.io/restart=1") or []
        return len(ps) == 2 and not any(p["spec"].get("schedulingGates") for p in ps)

    def b_admitted() -> bool:
        return condition(kctl.status(suite_ns, "restart-b"), "Admitted").get("status") == "True" and not (
            kctl.get(suite_ns, "jobs", "restart-b-r0") or {"spec": {"suspend": True}}
        )["spec"].get("suspend")

    first = wait_for(
        "A's next gang or B admitted", lambda: "A" if a_released() else "B" if b_admitted() else "", 300, 1
    )
    if first == "B":
        wait_for("A's next gang", a_released, 600, 1)
    waited = time.monotonic() - killed
    after = workload_of("restart-a-r0")
    b_state = condition(kctl.status(suite_ns, "restart-b"), "Admitted")
    print(
        f"[kueue] gang restart: rank killed -> next gang released in {waited:.1f}s; first: {first}; A's Workload "
        f"{(after or {}).get('metadata', {}).get('name')} (before: {before['metadata']['name']}); B: "
        f"{b_state.get('reason')}",
        file=sys.stderr,
    )
    # A's next gang may still be loading the model: deleted now, its trainer honours SIGTERM only once training (seen
    # here: over 150 s Terminating). Its pods go at once, so the namespace clean-up measures nothing of that.
    kctl("-n", suite_ns, "delete", "ftj", "restart-a", "restart-b", "--wait=false")
    kctl(
        "-n",
        suite_ns,
        "delete",
        "pods",
        "-l=kubetune.io/job-name=restart-a",
        "--grace-period=0",
        "--force",
        check=False,
    )
    assert first == "A", (
        f"B, which arrived after A, was admitted before A's restarted gang ({waited:.0f}s lost in the queue)"
    )
    # The same Workload, admitted all along (Kueue never saw the gang leave); B still waits behind A.
    assert after is not None and after["metadata"]["uid"] == before["metadata"]["uid"], (before, after)
    assert any(c["type"] == "Admitted" and c["status"] == "True" for c in after["status"]["conditions"]), (
        after
    )
    assert b_state.get("reason") == "QueuedByKueue", b_state


PREEMPTION = ROOT / "examples" / "kueue-preemption.yaml"
LOW_STEPS = 80


def preemption_example() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """examples/kueue-preemption.yaml: its Kueue objects as written (priorities, ClusterQueue with its preemption
    policy, LocalQueue), the ClusterQueue's quota sized for the harness (cpu 300m: room for one of the two 2-pod
    jobs of 2 x 100m; CPU binds here, the jobs ask no GPUs); and its FineTuneJobs, for their labels."""
    docs = list(yaml.safe_load_all(PREEMPTION.read_text()))
    queue_docs = [d for d in docs if d["apiVersion"].startswith("kueue.x-k8s.io/")]
    for d in queue_docs:
        if d["kind"] == "ClusterQueue":
            for flavor in d["spec"]["resourceGroups"][0]["flavors"]:
                for r in flavor["resources"]:
                    r["nominalQuota"] = {"cpu": "300m", "memory": "8Gi"}.get(r["name"], r["nominalQuota"])
    return queue_docs, {d["metadata"]["name"]: d for d in docs if d["kind"] == "FineTuneJob"}


def workload_of(kueue: Kueue, ns: str, job: str) -> dict[str, Any] | None:
    return next((w for w in kueue.workloads(ns) if w["metadata"]["ownerReferences"][0]["name"] == job), None)


def rank0(kctl: Kctl, ns: str, name: str) -> str | None:
    """The name of the job's running rank 0 (not being deleted)."""
    for p in kctl.get(ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []:
        meta = p["metadata"]
        if (
            meta["annotations"].get("batch.kubernetes.io/job-completion-index") == "0"
            and not meta.get("deletionTimestamp")
            and p["status"].get("phase") == "Running"
        ):
            return str(meta["name"])
    return None


@pytest.mark.xfail(
    strict=False,
    reason="open, in the operator: the CheckpointWritten Event needs a /progress read of rank 0 between the "
    "checkpoint and the pod's exit, and Kueue's eviction does not wait for one; in 2 of about 7 runs the preempted gang "
    "checkpointed (in S3, resumed from it) and exited first, and the Event was missing (KeyError: "
    "'CheckpointWritten'). To try: confirm the asked checkpoint from what the exited rank 0 leaves (its termination message)",
)
def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_from_a_checkpoint_taken_then(
    kueue, cluster, kctl, suite_ns, s3, s3_data, node, tmp_path
):
    """research-lora (priority 100) trains, with no scheduled checkpoint (checkpointSteps past maxSteps: every
    checkpoint in S3 was written because its pods were stopped); production-lora (10000) arrives and does not fit.
    Kueue preempts research-lora (Evicted, Preempted); its status and Events say so; its ranks write a checkpoint at
    or after the step shown when production-lora was applied, at most one step behind the last step the preempted
    gang logged; production-lora runs and succeeds; Kueue admits research-lora again, which resumes from that
    checkpoint and succeeds."""
    started = time.monotonic()
    low_name, high_name = "research-lora", "production-lora"
    queue_docs, examples = preemption_example()
    kctl.apply(suite_ns, yaml.safe_dump_all(queue_docs))
    # 30 s grace: an evicted pod that lingers after its checkpoint (seen once in test_eviction) is not waited on
    # 80 steps: the status's step lags rank 0 by up to a poll interval; the job must still be training when preempted
    low = job_doc(
        low_name, s3, s3_data, steps=LOW_STEPS, checkpoint_steps=1_000_000, terminationGracePeriodSeconds=30
    )
    low["metadata"]["labels"] = examples[low_name]["metadata"]["labels"]
    high = job_doc(high_name, s3, s3_data, steps=6, checkpoint_steps=6)
    high["metadata"]["labels"] = examples[high_name]["metadata"]["labels"]
    kctl.apply(suite_ns, low)

    def step() -> int:
        return int((kctl.status(suite_ns, low_name).get("progress") or {}).get("step") or 0)

    wait_for("research-lora training", lambda: step() >= 4 and rank0(kctl, suite_ns, low_name), 300, 0.5)
    pod0 = rank0(kctl, suite_ns, low_name)
    preempted_log = tmp_path / "preempted-rank0.log"
    # the preempted rank 0's whole log, to its exit (its pod is deleted then)
    with preempted_log.open("w") as out:
        follow = subprocess.Popen([KUBECTL, f"--kubeconfig={cluster.kubeconfig}", "-n", suite_ns, "logs", "-f",
                                   "-c", "trainer", str(pod0)], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert not checkpoints(s3, low_name)
        at_apply, t_apply = step(), time.monotonic()
        kctl.apply(suite_ns, high)

        def evicted() -> dict[str, Any] | None:
            wl = workload_of(kueue, suite_ns, f"{low_name}-r0") or {}
            conds = wl.get("status", {}).get("conditions") or []
            return next((c for c in conds if c["type"] == "Evicted" and c["status"] == "True"), None)

        eviction = wait_for("Kueue to preempt research-lora", evicted, 120, 0.5)
        t_evicted = time.monotonic()
        assert eviction["reason"] == "Preempted", eviction
        assert "prioritization in the ClusterQueue" in eviction["message"], eviction

        def shown() -> dict[str, Any] | None:
            status = kctl.status(suite_ns, low_name)
            admitted = condition(status, "Admitted")
            return (
                status
                if status.get("phase") == "Pending" and admitted.get("reason") == "EvictedByKueue"
                else None
            )

        status = wait_for("research-lora Pending, EvictedByKueue", shown, 60, 0.5)
        assert status["message"].startswith(
            "Evicted by Kueue (Preempted): Preempted to accommodate a workload"
        )
        assert condition(status, "Admitted")["status"] == "False"
        follow.wait(timeout=120)
    finally:
        follow.kill()
    trained = [int(m) for m in re.findall(rf"step (\d+)/{LOW_STEPS} loss", preempted_log.read_text())]
    assert trained, preempted_log.read_text()[-2000:]
    written = checkpoints(s3, low_name)  # its pods are gone: all it wrote on the way out
    assert written and min(written) >= at_apply, (written, at_apply)  # taken after the preemption began

    wait_for("production-lora Succeeded", lambda: kctl.phase(suite_ns, high_name) == "Succeeded", 600, 1)
    wait_for("research-lora admitted again",
             lambda: condition(kctl.status(suite_ns, low_name), "Admitted").get("status") == "True", 120, 1)  # fmt: skip

    def resumed() -> int | None:
        pod = rank0(kctl, suite_ns, low_name)
        found = re.search(r"resumed from checkpoint step (\d+)", node.logs(suite_ns, pod)) if pod else None
        return int(found.group(1)) if found else None

    resumed_at = wait_for("research-lora resumed", resumed, 300, 1)
    t_resumed = time.monotonic()
    assert resumed_at == max(written), (resumed_at, written)  # the newest checkpoint, the preemption's
    assert resumed_at >= max(trained) - 1, (resumed_at, max(trained))  # at most one optimizer step lost

    events = kctl.get(suite_ns, "events", None, f"--field-selector=involvedObject.name={low_name}") or []
    said = {e["reason"]: (e["type"], e["message"]) for e in events}
    assert (
        said["EvictedByKueue"][0] == "Warning" and "Preempted to accommodate" in said["EvictedByKueue"][1]
    ), said
    assert "Kueue evicted the workload: Preempted" in said["CheckpointRequested"][1], said
    written_event = said["CheckpointWritten"][1]
    assert "Kueue evicted the workload: Preempted" in written_event, said
    event_step = re.search(r"Checkpoint at step (\d+)", written_event)
    assert event_step is not None and int(event_step.group(1)) in written, (written_event, written)

    wait_for("research-lora Succeeded", lambda: kctl.phase(suite_ns, low_name) == "Succeeded", 600, 1)
    final = kctl.status(suite_ns, low_name)
    assert not final.get("restarts"), final  # a preemption is not a gang restart
    priorities = {
        w["metadata"]["ownerReferences"][0]["name"]: w["spec"]["priority"] for w in kueue.workloads(suite_ns)
    }
    assert priorities[f"{low_name}-r0"] == 100 and priorities[f"{high_name}-r0"] == 10000, priorities
    print(f"\n[kueue] preemption: {high_name} applied at step {at_apply}, Evicted {t_evicted - t_apply:.1f}s later; "
          f"preempted gang's last step {max(trained)}, checkpoints {written}; resumed from {resumed_at} "
          f"{t_resumed - t_apply:.0f}s after; lastCheckpoint {final.get('lastCheckpoint')}, restarts {final.get('restarts')}; events "
          f"{sorted(said)}; whole test {time.monotonic() - started:.0f}s", file=sys.stderr)  # fmt: skip
