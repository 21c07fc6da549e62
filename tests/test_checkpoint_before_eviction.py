"""A checkpoint before any eviction, pass by pass against the in-memory cluster (tests/fake_cluster.py): for each
way a running gang is stopped from outside (DisruptionTarget, a pod deleted, Kueue's eviction, a Job suspended by a
queue, the user's suspend) the operator asks rank 0 for a checkpoint once, records it, keeps status.lastCheckpoint
current, and holds its own suspend until the checkpoint is written (at most the grace period)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubetune.api import names
from kubetune.api.contract import ExitCode, ProgressReport, TerminationMessage, TrainerPhase
from kubetune.api.models import CheckpointRecord, Progress
from kubetune.controller import checkpoints
from kubetune.controller import reconcile as rec
from kubetune.status.disruption import disruption
from test_reconcile_passes import NOW, World, running

KEY = ("ml", "demo")
RANK0 = "demo-r0-0"
WRITTEN = CheckpointRecord(
    step=13, uri="s3://out/demo/checkpoints/step-00000013/", time="2026-03-01T12:00:05Z"
)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "now", lambda: NOW)


def training(**spec: Any) -> World:
    """A running 2-node gang whose rank 0 reported step 12 of its step loop."""
    world = running(distributed={"nodes": 2, "gpusPerNode": 0}, **spec)
    world.store.put_progress(
        KEY, RANK0, Progress(step=12, total_steps=100, trainer_phase="Training"), time.monotonic()
    )
    world.reconcile()
    world.kube.forget_calls()
    return world


def rank0_served(world: World, served: int = 1, checkpoint: CheckpointRecord = WRITTEN) -> None:
    """The poller's next read: rank 0 wrote the checkpoint asked for."""
    progress = Progress(step=checkpoint.step, total_steps=100, trainer_phase="Training")
    world.store.put_progress(KEY, RANK0, progress, time.monotonic(), checkpoint, served)


def change_pod(world: World, name: str, **meta_and_conditions: Any) -> None:
    pod = world.kube.get("Pod", "ml", name)
    assert pod is not None
    if "conditions" in meta_and_conditions:
        pod["status"]["conditions"] = meta_and_conditions.pop("conditions")
    pod["metadata"].update(meta_and_conditions)
    world.kube.put(pod)
    world.watch()


def evicted(world: World, name: str = "demo-r0-1") -> None:
    """What the Eviction API does (kubectl drain): DisruptionTarget, then a delete with the grace period."""
    target = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
              "message": "Eviction API: evicting"}  # fmt: skip
    change_pod(world, name, conditions=[target], deletionTimestamp="2026-03-01T12:00:00Z")


def events(world: World) -> list[tuple[str, str]]:
    return [e[:2] for e in world.kube.events()]


def asked(world: World) -> list[str]:
    return [c.name for c in world.kube.requests if c.verb == "checkpoint"]


def test_an_eviction_asks_rank_0_once_and_records_the_checkpoint_written() -> None:
    world = training()
    evicted(world)
    world.reconcile()
    assert asked(world) == [RANK0]
    assert events(world) == [("Normal", "CheckpointRequested")]
    message = world.kube.events()[0][2]
    assert "pod demo-r0-1: DisruptionTarget EvictionByEvictionAPI" in message and RANK0 in message
    world.reconcile()
    world.reconcile()
    assert asked(world) == [RANK0]  # asked once per gang, however many passes
    rank0_served(world)
    world.reconcile()
    assert world.status["lastCheckpoint"] == {"step": 13, "uri": WRITTEN.uri, "time": WRITTEN.time}
    assert events(world)[-1] == ("Normal", "CheckpointWritten")
    assert "step 13" in world.kube.events()[-1][2] and "EvictionByEvictionAPI" in world.kube.events()[-1][2]


def test_a_pod_deleted_without_eviction_asks_too() -> None:
    world = training()
    change_pod(world, "demo-r0-1", deletionTimestamp="2026-03-01T12:00:00Z")
    world.reconcile()
    assert asked(world) == [RANK0] and "pod demo-r0-1 is being deleted" in world.kube.events()[0][2]


def preempted_workload(job: dict[str, Any], message: str) -> dict[str, Any]:
    """The Kueue Workload of the gang's Job, admitted and then evicted (Preempted) with `message`."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": "job-demo-r0-abcde", "namespace": "ml",
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo-r0", "uid": job["metadata"]["uid"]}]},
        "status": {"conditions": [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved in ClusterQueue cq"},
            {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""},
            {"type": "Evicted", "status": "True", "reason": "Preempted", "message": message}]},
    }  # fmt: skip


def test_kueue_evicting_the_workload_asks() -> None:
    world = training(labels={"kueue.x-k8s.io/queue-name": "team-a"})
    job = world.job()
    world.kube.put(
        preempted_workload(
            job, "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"
        )
    )
    world.watch()
    world.reconcile()
    assert asked(world) == [RANK0]
    assert "Kueue evicted the workload: Preempted (Preempted to accommodate" in world.kube.events()[0][2]


def test_kueues_eviction_is_named_as_the_cause_when_the_pods_are_already_going() -> None:
    """Kueue preempts: Evicted on the Workload, the Job suspended, its pods deleted, all seen in one pass. The
    Event names the preemption (the cause), not a pod being deleted (its consequence)."""
    world = training(labels={"kueue.x-k8s.io/queue-name": "team-a"})
    job = world.job()
    world.kube.put(preempted_workload(job, "Preempted to accommodate a workload"))
    change_pod(world, "demo-r0-1", deletionTimestamp="2026-03-01T12:00:00Z")
    change_pod(world, RANK0, deletionTimestamp="2026-03-01T12:00:00Z")
    world.reconcile()
    assert asked(world) == [RANK0]
    requested = [e for e in world.kube.events() if e[1] == "CheckpointRequested"]
    assert len(requested) == 1 and "Kueue evicted the workload: Preempted" in requested[0][2], requested


def test_a_queue_suspending_the_job_asks_and_is_not_fought() -> None:
    world = training()
    world.set_job(suspend=True)  # Kueue suspends the Job it had admitted (the pods are still up)
    world.reconcile()
    assert asked(world) == [RANK0] and "the Job was suspended" in world.kube.events()[0][2]
    assert world.job()["spec"]["suspend"] is True
    assert ("patch", "Job", "demo-r0") not in world.kube.writes()


def test_the_users_suspend_waits_for_the_checkpoint_then_suspends() -> None:
    world = training()
    world.edit_spec(runPolicy={"suspend": True})
    wake = world.reconcile()
    assert asked(world) == [RANK0]
    assert (
        world.job()["spec"]["suspend"] is False
    )  # held: the pods keep running until the checkpoint is written
    assert wake is not None and 0 < wake <= 300  # at most terminationGracePeriodSeconds
    assert "suspended once it is written (at most 300s)" in world.kube.events()[0][2]
    world.reconcile()
    assert world.job()["spec"]["suspend"] is False and asked(world) == [RANK0]
    rank0_served(world)
    world.reconcile()
    assert (
        world.job()["spec"]["suspend"] is True
    )  # now the pods go (SIGTERM: nothing older than step 13 is lost)
    assert events(world) == [("Normal", "CheckpointRequested"), ("Normal", "CheckpointWritten")]
    assert world.status["lastCheckpoint"]["step"] == 13


def test_the_users_suspend_waits_no_longer_than_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    world = training(terminationGracePeriodSeconds=60)
    world.edit_spec(runPolicy={"suspend": True})
    world.reconcile()
    assert world.job()["spec"]["suspend"] is False
    later = time.time() + 61
    monkeypatch.setattr(checkpoints.time, "time", lambda: later)
    world.reconcile()
    assert world.job()["spec"]["suspend"] is True
    warning = [e for e in world.kube.events() if e[1] == "CheckpointNotConfirmed"]
    assert warning and "within 60s" in warning[0][2] and warning[0][0] == "Warning"


def test_rank_0_unreachable_or_not_training_does_not_hold_the_suspend() -> None:
    world = training()
    world.kube.trainer_reachable = False
    world.edit_spec(runPolicy={"suspend": True})
    world.reconcile()
    assert world.job()["spec"]["suspend"] is True  # nothing to wait for: SIGTERM is the checkpoint's trigger
    loading = running()  # no progress read yet: the trainer is still loading, nothing to keep
    loading.edit_spec(runPolicy={"suspend": True})
    loading.reconcile()
    assert asked(loading) == [] and loading.job()["spec"]["suspend"] is True


def test_last_checkpoint_comes_from_a_stopped_ranks_termination_message() -> None:
    world = training()
    report = ProgressReport(
        step=14, phase=TrainerPhase.TRAINING, last_checkpoint=WRITTEN.model_copy(update={"step": 14})
    )
    for name in [p["metadata"]["name"] for p in world.kube.of_kind("Pod")]:
        del world.kube.objects[("Pod", "ml", name)]
    world.pods("Failed", TerminationMessage.build(ExitCode.PREEMPTED, "stopped by SIGTERM", report))
    world.reconcile()
    assert world.status["lastCheckpoint"]["step"] == 14
    assert world.status["phase"] == "Restarting"


def test_no_disruption_for_a_gang_that_is_simply_running_or_already_gone() -> None:
    world = training()
    spec = rec.parse_spec(world.ftj["spec"], name="demo")
    pods = world.kube.of_kind("Pod")
    assert disruption(spec, world.job(), pods, None) is None
    assert disruption(spec, None, pods, None) is None
    job = world.job()
    job["metadata"]["deletionTimestamp"] = (
        "2026-03-01T12:00:00Z"  # the operator's own restart: not a disruption
    )
    assert disruption(spec, job, pods, None) is None
    applied = world.job()
    applied["spec"]["suspend"] = True
    applied["metadata"]["annotations"][names.ANNOTATION_SUSPEND_APPLIED] = (
        "true"  # the operator's own suspend
    )
    assert disruption(spec, applied, pods, None) is None


def test_a_rank_lost_with_its_node_restarts_the_gang_without_asking() -> None:
    """The taint manager's eviction of a pod on an unreachable node: its peers cannot checkpoint with it (NodeLost)."""
    world = training()
    lost = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint"}  # fmt: skip
    change_pod(world, "demo-r0-1", conditions=[lost], deletionTimestamp="2026-03-01T12:00:00Z")
    world.reconcile()
    assert asked(world) == [] and world.status["phase"] == "Restarting"
    assert not [e for e in events(world) if e[1].startswith("Checkpoint")]


def test_the_operators_own_suspend_deleting_the_pods_is_not_asked_again() -> None:
    world = training()
    spec = rec.parse_spec(world.ftj["spec"], name="demo")
    job = world.job()
    job["spec"]["suspend"] = True
    job["metadata"]["annotations"][names.ANNOTATION_SUSPEND_APPLIED] = "true"
    pods = world.kube.of_kind("Pod")
    for pod in pods:  # the Job controller deletes the suspended Job's pods
        pod["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    assert disruption(spec, job, pods, None) is None
    job["metadata"]["annotations"][names.ANNOTATION_SUSPEND_APPLIED] = "false"  # a queue suspended it instead
    found = disruption(spec, job, pods, None)
    assert found is not None and "being deleted" in found.cause
