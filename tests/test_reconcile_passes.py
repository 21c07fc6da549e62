"""The reconcile passes against an in-memory cluster (tests/fake_cluster.py), in the manner of
controller-runtime's fake-client tests: each case sets up what the watches would show (the FineTuneJob, its
Job and pods), runs passes of `reconcile()`, and asserts the exact writes it made, in order, and the status
it left. No API server: the real one is the e2e suite's; here each write the controller owes is pinned, so
removing one fails a test in seconds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fake_cluster import FakeCluster
from kubetune.api import names
from kubetune.api.contract import ExitCode, TerminationMessage
from kubetune.controller import reconcile as rec
from kubetune.controller.settings import Settings
from kubetune.controller.store import Store
from kubetune.status import runs
from operator_samples import manifest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
CREATE_GANG = [
    ("create", "Job", "demo-r0"),
    ("create", "ConfigMap", "demo-config"),
    ("create", "Service", "demo"),
]
STATUS_AND_EVENT = [("patch-status", "FineTuneJob", "demo"), ("event", "FineTuneJob", "demo")]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "now", lambda: NOW)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


class World:
    """The fake cluster, and a Store filled from it as the watches would fill it."""

    def __init__(self, ftj: dict[str, Any], unserved: tuple[str, ...] = ()) -> None:
        self.kube = FakeCluster(ftj, unserved=unserved)
        self.store = Store()
        self.settings = Settings(trainer_image="trainer:test")
        self.key = (ftj["metadata"]["namespace"], ftj["metadata"]["name"])
        self.watch()

    def watch(self) -> None:
        """Deliver what the cluster holds now: every FineTuneJob, Job and Pod (what is gone is gone)."""
        self.store = Store(progress=self.store.progress, asks=self.store.asks)  # the operator's memory stays
        for obj in self.kube.of_kind("FineTuneJob"):
            self.store.put_ftj(obj)
        for kind in ("Job", "Pod", "Workload"):
            for obj in self.kube.of_kind(kind):
                self.store.put_child(kind, obj)

    def reconcile(self) -> float | None:
        """One pass, then the watch events its writes cause."""
        wake = rec.reconcile(self.key, self.store, self.settings, self.kube)
        self.watch()
        return wake

    # ------------------------------------------------------------ what others do in a real cluster

    @property
    def ftj(self) -> dict[str, Any]:
        got = self.kube.get("FineTuneJob", *self.key)
        assert got is not None
        return got

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.ftj.get("status") or {})

    def job(self, name: str = "demo-r0") -> dict[str, Any]:
        got = self.kube.get("Job", "ml", name)
        assert got is not None, f"no Job {name}"
        return got

    def edit_spec(self, **changes: Any) -> None:
        """A user's edit: the spec changes and the generation moves."""
        ftj = self.ftj
        ftj["spec"].update(changes)
        ftj["metadata"]["generation"] += 1
        self.kube.put(ftj)
        self.watch()

    def set_job(self, name: str = "demo-r0", **spec: Any) -> None:
        """Another controller (Kueue, the Job controller) changes the Job."""
        job = self.job(name)
        job["spec"].update(spec)
        self.kube.put(job)
        self.watch()

    def job_condition(self, type_: str, name: str = "demo-r0") -> None:
        job = self.job(name)
        job.setdefault("status", {})["conditions"] = [
            {"type": type_, "status": "True", "reason": type_, "message": ""}
        ]
        self.kube.put(job)
        self.watch()

    def pods(
        self,
        phase: str = "Running",
        terminated: TerminationMessage | None = None,
        job: str = "demo-r0",
        suffix: str = "",
        ranks: tuple[int, ...] | None = None,
    ) -> None:
        """The Job controller, the operator's release and the kubelet: one pod per node of `job` (or the `ranks`
        given), of the current gang generation, in `phase` (rank 0 left `terminated`)."""
        owner = self.job(job)
        restart = str(self.status.get("restarts") or 0)
        for index in range(owner["spec"]["parallelism"]) if ranks is None else ranks:
            state: dict[str, Any] = {"running": {"startedAt": iso(NOW)}}
            if terminated is not None:
                code = terminated.exit_code
                state = {
                    "terminated": {"exitCode": code, "message": terminated.to_text(), "finishedAt": iso(NOW)}
                }
            self.kube.put({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{job}-{index}{suffix}", "namespace": "ml",
                             "labels": {names.LABEL_JOB: "demo", names.LABEL_RESTART: restart,
                                        names.JOB_UID_LABEL: owner["metadata"]["uid"]},
                             "annotations": {names.COMPLETION_INDEX: str(index)}},
                "spec": {"nodeName": "node-1"},
                "status": {"phase": phase, "podIP": f"10.0.0.{index + 1}",
                           "containerStatuses": [{"name": names.CONTAINER, "state": state}]},
            })  # fmt: skip
        self.watch()

    def gated_pods(
        self, suffix: str = "-b", job: str = "demo-r0", ranks: tuple[int, ...] | None = None
    ) -> None:
        """The Job controller: a pod for each rank (or the `ranks` given) from the Job's template, behind the
        gang gate, with no generation yet."""
        owner = self.job(job)
        template = owner["spec"]["template"]
        for index in range(owner["spec"]["parallelism"]) if ranks is None else ranks:
            self.kube.put({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{job}-{index}{suffix}", "namespace": "ml",
                             "labels": {**template["metadata"]["labels"], names.JOB_UID_LABEL: owner["metadata"]["uid"]},
                             "annotations": {names.COMPLETION_INDEX: str(index)}},
                "spec": {"schedulingGates": copy.deepcopy(template["spec"]["schedulingGates"])},
                "status": {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]},
            })  # fmt: skip
        self.watch()

    def kubelet_stops(self) -> None:
        """The kubelet has stopped every pod being deleted (and the Job controller let it go)."""
        for pod in self.kube.of_kind("Pod"):
            if pod["metadata"].get("deletionTimestamp"):
                del self.kube.objects[("Pod", "ml", pod["metadata"]["name"])]
        self.watch()

    def collect_garbage(self) -> None:
        """The garbage collector: pods whose Job is gone go too."""
        jobs = {j["metadata"]["uid"] for j in self.kube.of_kind("Job")}
        for pod in self.kube.of_kind("Pod"):
            if pod["metadata"]["labels"].get(names.JOB_UID_LABEL) not in jobs:
                del self.kube.objects[("Pod", "ml", pod["metadata"]["name"])]
        self.watch()


def new_job(**spec: Any) -> dict[str, Any]:
    doc = manifest(**spec)
    doc["metadata"]["generation"] = 1
    return doc


def created(**spec: Any) -> World:
    """A job whose first pass has created its gang."""
    world = World(new_job(**spec))
    world.reconcile()
    world.kube.forget_calls()
    return world


def running(**spec: Any) -> World:
    world = created(**spec)
    world.pods("Running")
    world.reconcile()
    world.kube.forget_calls()
    return world


def finished(exit_code: int, message: str = "", **spec: Any) -> World:
    """A running gang whose trainers have all exited with `exit_code`."""
    world = running(**spec)
    for name in [p["metadata"]["name"] for p in world.kube.of_kind("Pod")]:
        del world.kube.objects[("Pod", "ml", name)]
    world.pods(
        "Succeeded" if exit_code == 0 else "Failed", TerminationMessage.build(exit_code, message or "done")
    )
    return world


def succeeded(**spec: Any) -> World:
    world = finished(0, **spec)
    world.job_condition("Complete")
    world.reconcile()
    world.kube.forget_calls()
    return world


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    given: Callable[[], World]
    """The world before the pass under test (its earlier passes' calls forgotten)."""
    writes: list[tuple[str, str, str]]
    """(verb, kind, name) of every write of the pass, in order."""
    phase: str
    event: tuple[str, str] | None = None
    """(type, reason) of the Event the pass recorded, if one."""
    then: Callable[[World], None] | None = None
    """Further checks of what was written."""


def suspended_world() -> World:
    world = created(runPolicy={"suspend": True})
    return world


def queue_admits() -> World:
    world = suspended_world()
    world.set_job(suspend=False)  # Kueue unsuspends the Job it admitted
    return world


def user_resumes() -> World:
    world = suspended_world()
    world.edit_spec(runPolicy={"suspend": False})
    return world


def user_suspends() -> World:
    world = running()
    world.edit_spec(runPolicy={"suspend": True})
    return world


GANG = {"distributed": {"nodes": 2}}


def rank_failed() -> World:
    """A 2-pod gang training; rank 1 exits with a retryable error, rank 0 still runs."""
    world = running(**GANG)
    del world.kube.objects[("Pod", "ml", "demo-r0-1")]
    world.pods("Failed", TerminationMessage.build(ExitCode.INFRASTRUCTURE, "NCCL timeout"), ranks=(1,))
    return world


def node_lost() -> World:
    """A 2-pod gang training; rank 1's node stopped answering and the taint manager deleted its pod, which its
    kubelet will never finish."""
    world = running(**GANG)
    pod = world.kube.get("Pod", "ml", "demo-r0-1")
    assert pod is not None
    pod["metadata"]["deletionTimestamp"] = iso(NOW)
    pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                                    "message": "Taint manager: deleting due to NoExecute taint"}]  # fmt: skip
    world.kube.put(pod)
    world.watch()
    return world


def check_node_lost(world: World) -> None:
    lost = world.kube.get("Pod", "ml", "demo-r0-1")
    assert lost is not None and lost["status"]["phase"] == "Failed"  # the Job controller replaces it now
    # its peer, hung in a collective with the lost rank, cannot checkpoint: stopped at once, not after its grace
    deletes = [c.body for c in world.kube.requests if c.short == ("delete", "Pod", "demo-r0-0")]
    assert deletes == [{"gracePeriodSeconds": 1}], deletes
    assert world.job()["metadata"]["uid"] == "uid-job-2"
    world.gated_pods()  # replacements for both ranks; the lost pod stays Terminating on its node
    world.kubelet_stops()  # rank 0 stopped (the fake's kubelet_stops takes the lost pod too: put it back)
    world.kube.put(lost)
    world.watch()
    world.kube.forget_calls()
    world.reconcile()
    assert ("release", "Pod", "demo-r0-0-b") in world.kube.writes()  # nothing waits for the lost pod


def rank_deleted() -> World:
    """A 2-pod gang training; someone deleted rank 1's pod (kubectl delete pod), and it has stopped (SIGTERM: it
    checkpointed on the way out)."""
    world = running(**GANG)
    pod = world.kube.get("Pod", "ml", "demo-r0-1")
    assert pod is not None
    pod["metadata"]["deletionTimestamp"] = iso(NOW)
    pod["status"]["phase"] = "Failed"
    world.kube.put(pod)
    world.watch()
    return world


def job_controller_stuck() -> World:
    """Restarting; rank 0 stopped two minutes ago but the Job controller never took its finalizer off (it cannot
    update the Job's status): the pod never goes and is never replaced."""
    world = restarting()
    pod = world.kube.get("Pod", "ml", "demo-r0-0")
    assert pod is not None
    pod["metadata"]["finalizers"] = ["batch.kubernetes.io/job-tracking"]
    pod["status"]["phase"] = "Failed"
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 143, "finishedAt": iso(NOW - timedelta(seconds=120))}
    }
    world.kube.put(pod)
    world.watch()
    return world


def resumed_after_a_long_hold() -> World:
    """Kueue admitted the gang again a moment ago, five minutes after it preempted it: the Job is resumed, its status
    (the Job controller has not caught up yet) still says Suspended since then, and it has made no pods yet."""
    world = running(**GANG)
    job = world.job()
    job["spec"]["suspend"] = False
    job.setdefault("status", {})["conditions"] = [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                                   "lastTransitionTime": iso(NOW - timedelta(seconds=300))}]  # fmt: skip
    world.kube.put(job)
    for i in (0, 1):
        world.kube.objects.pop(("Pod", "ml", f"demo-r0-{i}"))
    world.watch()
    return world


def restarting() -> World:
    """After the restart pass: rank 0 terminating (SIGTERM: it checkpoints), and the Job controller has replaced
    the failed rank 1 behind the gang gate."""
    world = rank_failed()
    world.reconcile()
    world.gated_pods(ranks=(1,))
    world.kube.forget_calls()
    return world


def old_gang_gone() -> World:
    """Rank 0 has stopped; the Job controller has replaced it too."""
    world = restarting()
    world.kubelet_stops()
    world.gated_pods(ranks=(0,))
    return world


def job_failed() -> World:
    """The Job itself failed (a pod failure no rule of its podFailurePolicy matches): it cannot run a gang again."""
    world = running()
    world.job_condition("Failed")
    return world


def job_failed_gang_gone() -> World:
    world = job_failed()
    world.reconcile()
    world.collect_garbage()
    world.kube.forget_calls()
    return world


def unschedulable(after: float) -> World:
    """A 2-pod coscheduling gang released `after` seconds ago; the scheduler placed none of it."""
    world = created(scheduling={"gang": {"scheduler": "coscheduling", "scheduleTimeoutSeconds": 60}}, **GANG)
    world.gated_pods(suffix="")
    world.reconcile()  # released
    for pod in world.kube.of_kind("Pod"):
        pod["metadata"]["annotations"][names.ANNOTATION_RELEASED] = iso(NOW - timedelta(seconds=after))
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/1 nodes are available: 1 Insufficient cpu."}]  # fmt: skip
        world.kube.put(pod)
    world.watch()
    world.kube.forget_calls()
    return world


def trained_fields_edited() -> World:
    world = succeeded()
    world.edit_spec(training={"maxSteps": 7})
    return world


def new_run_gang_gone() -> World:
    world = trained_fields_edited()
    world.reconcile()
    world.collect_garbage()
    world.kube.forget_calls()
    return world


def serving_without_kserve() -> World:
    world = World(new_job(serving={}), unserved=("InferenceService",))
    world.reconcile()
    world.pods("Running")
    world.reconcile()
    for name in [p["metadata"]["name"] for p in world.kube.of_kind("Pod")]:
        del world.kube.objects[("Pod", "ml", name)]
    world.pods("Succeeded", TerminationMessage.build(0, "done"))
    world.job_condition("Complete")
    world.kube.forget_calls()
    return world


def ttl_passed() -> World:
    world = succeeded(runPolicy={"ttlSecondsAfterFinished": 60})
    ftj = world.ftj
    ftj["status"]["completionTime"] = iso(NOW - timedelta(hours=1))
    world.kube.put(ftj)
    world.watch()
    return world


def deadline_passed() -> World:
    world = running(runPolicy={"activeDeadlineSeconds": 600})
    ftj = world.ftj
    ftj["status"]["startTime"] = iso(NOW - timedelta(hours=1))
    world.kube.put(ftj)
    world.watch()
    return world


def check_new_job(world: World) -> None:
    job = world.job()
    assert job["spec"]["suspend"] is False and job["metadata"]["annotations"] == {
        names.ANNOTATION_SUSPEND_APPLIED: "false"
    }
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "demo", True)
    assert (
        world.kube.get("ConfigMap", "ml", "demo-config") is not None
        and world.kube.get("Service", "ml", "demo") is not None
    )
    status = world.status
    assert status["workload"] == "demo-r0" and status["observedGeneration"] == 1 and status["trainedSpecHash"]


def check_deferred(world: World) -> None:
    job = world.job()
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["annotations"][names.ANNOTATION_DEFERRED] == "ConfigMap,Service"
    assert world.kube.get("ConfigMap", "ml", "demo-config") is None  # a queued job costs one object


def check_admitted(world: World) -> None:
    annotations = world.job()["metadata"]["annotations"]
    assert (
        names.ANNOTATION_DEFERRED not in annotations
        and annotations[names.ANNOTATION_SUSPEND_APPLIED] == "true"
    )
    assert world.job()["spec"]["suspend"] is False  # the queue's decision, not fought


def check_resumed(world: World) -> None:
    job = world.job()
    assert job["spec"]["suspend"] is False and job["metadata"]["annotations"] == {
        names.ANNOTATION_SUSPEND_APPLIED: "false"
    }
    assert world.kube.get("ConfigMap", "ml", "demo-config") is not None


def check_suspended(world: World) -> None:
    patch = world.kube.requests[-1].body
    assert patch == {
        "metadata": {"annotations": {names.ANNOTATION_SUSPEND_APPLIED: "true"}},
        "spec": {"suspend": True},
    }


def check_restarting(world: World) -> None:
    status = world.status
    assert status["restarts"] == 1 and status["workload"] == "demo-r0"
    assert (
        status["lastFailure"]["exitCode"] == ExitCode.INFRASTRUCTURE and "NCCL timeout" in status["message"]
    )
    assert world.job()["metadata"]["uid"] == "uid-job-2"  # the Job created first: the same Kueue Workload
    assert world.kube.get("Pod", "ml", "demo-r0-1") is not None  # the failed rank is kept (its logs)
    deletes = [c.body for c in world.kube.requests if c.short == ("delete", "Pod", "demo-r0-0")]
    assert deletes == [None], deletes  # its peer gets its grace period: it checkpoints on SIGTERM


def check_next_gang(world: World) -> None:
    pods = {p["metadata"]["name"]: p for p in world.kube.of_kind("Pod")}
    assert set(pods) == {"demo-r0-0-b", "demo-r0-1-b", "demo-r0-1"}
    for name in ("demo-r0-0-b", "demo-r0-1-b"):
        assert pods[name]["metadata"]["labels"][names.LABEL_RESTART] == "1"
        assert "schedulingGates" not in pods[name]["spec"]
    released = [c.body["annotations"] for c in world.kube.requests if c.verb == "release"]
    assert released == [{names.ANNOTATION_RELEASED: iso(NOW)}] * 2
    world.kube.forget_calls()
    world.pods("Running", suffix="-b")
    world.reconcile()
    assert world.kube.writes() == STATUS_AND_EVENT and world.status["phase"] == "Initializing"


def check_first_gang(world: World) -> None:
    for pod in world.kube.of_kind("Pod"):
        assert pod["metadata"]["labels"][names.LABEL_RESTART] == "0" and "schedulingGates" not in pod["spec"]


def check_new_job_after_a_failed_one(world: World) -> None:
    job = world.job()
    assert job["metadata"]["uid"] != "uid-job-2" and world.status["restarts"] == 1


def check_unschedulable(world: World) -> None:
    status = world.status
    assert "0/1 nodes are available: 1 Insufficient cpu." in status["message"]
    assert "scheduleTimeoutSeconds (60s)" in status["message"]
    running_cond = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (running_cond["status"], running_cond["reason"]) == ("False", "Unschedulable")
    world.kube.forget_calls()
    assert world.reconcile() is None  # nothing more to wait for: the scheduler's answer wakes it
    assert world.kube.writes() == []  # no second Event, no new Job, no pod touched


def check_not_yet_unschedulable(world: World) -> None:
    assert world.reconcile() == pytest.approx(20.5)  # looks again when the timeout has passed


def check_failed_for_the_user(world: World) -> None:
    status = world.status
    assert status["lastFailure"]["reason"] == "DatasetInvalid" and status["restarts"] == 0
    assert "bad record 3" in status["message"]


UNREACHABLE = (
    "pod demo-r0-1-x7k2p (node rank 1) cannot reach rank 0's pod demo-r0-0 at demo-r0-0.demo port 29500 "
    "(torchrun's rendezvous) for 20s: connecting to 10.0.0.1:29500 timed out (packets dropped)"
)
NETWORK = {
    "backend": "gloo", "worldSize": 2, "megabytes": 4, "allReduceMs": 3.9, "allReduceBusGbps": 1.03,
    "minBandwidthGbps": 0.46, "maxLatencyMs": 0.15, "seconds": 0.1, "checkedAt": "2026-03-01T11:59:00Z",
    "pairs": [{"source": 1, "target": 0, "sourcePod": "demo-r0-1", "targetPod": "demo-r0-0", "latencyMs": 0.15,
               "bandwidthGbps": 0.56},
              {"source": 0, "target": 1, "sourcePod": "demo-r0-0", "targetPod": "demo-r0-1", "latencyMs": 0.14,
               "bandwidthGbps": 0.46}],
}  # fmt: skip


def network_checked() -> World:
    """Rank 0 has run the network check and says so in its progress report."""
    from kubetune.status.progress import to_progress

    world = running(distributed={"nodes": 2})
    report = to_progress({"phase": "Initializing", "network": NETWORK}, iso(NOW))
    world.store.put_progress(world.key, "demo-r0-0", report, 0.0)
    return world


def check_network_status(world: World) -> None:
    network = world.status["network"]
    assert network["backend"] == "gloo" and network["worldSize"] == 2
    assert [(p["source"], p["target"], p["bandwidthGbps"]) for p in network["pairs"]] == [
        (1, 0, 0.56),
        (0, 1, 0.46),
    ]
    assert "network" not in world.status["progress"]  # once, in status.network


def check_network_unreachable(world: World) -> None:
    status = world.status
    assert status["lastFailure"]["reason"] == "NetworkUnreachable" and status["lastFailure"]["exitCode"] == 72
    assert status["restarts"] == 0  # a restart cannot help: the network must change first
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "NetworkUnreachable"
    for needle in ("demo-r0-1-x7k2p", "demo-r0-0", "port 29500", "gang was stopped"):
        assert needle in failed["message"], failed["message"]


def check_succeeded(world: World) -> None:
    status = world.status
    assert status["artifacts"]["manifest"] == "s3://out/demo/manifest.json" and status["completionTime"]


def check_new_run(world: World) -> None:
    status = world.status
    assert status["run"] == 2 and status["runUri"] == "s3://out/demo/run-2" and len(status["runs"]) == 1
    assert "startTime" not in status and "artifacts" not in status  # cleared by the merge patch


def check_new_run_gang(world: World) -> None:
    config = world.kube.requests[2].body  # this run's config replaces the finished run's
    assert "s3://out/demo/run-2" in config["data"]["trainer-config.yaml"]


def check_serving(world: World) -> None:
    status = world.status
    isvc = world.kube.get("InferenceService", "ml", "demo")
    assert isvc is not None and status["serving"]["name"] == "demo"
    assert isvc["metadata"]["ownerReferences"][0]["name"] == "demo"
    assert names.LABEL_JOB not in isvc["metadata"]["labels"]  # its pods are not the training gang


def check_serving_missing(world: World) -> None:
    serving = next(c for c in world.status["conditions"] if c["type"] == "Serving")
    assert (serving["status"], serving["reason"]) == ("False", "ServingAPIMissing")


def check_pod_group(world: World) -> None:
    group = world.kube.get("PodGroup", "ml", "demo")
    assert group is not None and group["spec"]["minMember"] == 1
    assert group["metadata"]["ownerReferences"][0]["name"] == "demo"
    ready = next(c for c in world.status["conditions"] if c["type"] == "PodGroupReady")
    assert (ready["status"], ready["reason"]) == ("True", "PodGroupCreated")


def check_pod_group_missing(world: World) -> None:
    assert world.kube.of_kind("Job") == []
    ready = next(c for c in world.status["conditions"] if c["type"] == "PodGroupReady")
    assert (ready["status"], ready["reason"]) == ("False", "PodGroupCRDMissing")
    assert "podgroups.scheduling.volcano.sh" in ready["message"]
    world.kube.forget_calls()
    assert world.reconcile() == 30.0  # looks again later: CRDs are not watched
    assert world.kube.writes() == [("create", "PodGroup", "demo")]  # no second Warning, no status write
    world.kube.unserved.clear()  # the scheduler is installed
    world.reconcile()
    assert world.kube.get("Job", "ml", "demo-r0") is not None


def check_deleted(world: World) -> None:
    assert world.kube.get("FineTuneJob", "ml", "demo") is None


CASES = {
    "create: the gang's Job first, then its config and DNS, then the status and its Event": Case(
        lambda: World(new_job()),
        [*CREATE_GANG, *STATUS_AND_EVENT],
        "Pending",
        ("Normal", "PodsPending"),
        check_new_job,
    ),
    "create suspended: the Job alone, its config and DNS deferred": Case(
        lambda: World(new_job(runPolicy={"suspend": True})),
        [("create", "Job", "demo-r0"), *STATUS_AND_EVENT],
        "Suspended",
        ("Normal", "JobSuspended"),
        check_deferred,
    ),
    "at rest: a pass that finds nothing new writes nothing": Case(running, [], "Initializing"),
    "pods up: status only": Case(
        lambda: (w := created(), w.pods("Running"))[0],
        STATUS_AND_EVENT,
        "Initializing",
        ("Normal", "PodsStarting"),
    ),  # fmt: skip
    "admit: a queue unsuspended the Job, its config and DNS follow": Case(
        queue_admits,
        [
            *STATUS_AND_EVENT,
            ("create", "ConfigMap", "demo-config"),
            ("create", "Service", "demo"),
            ("patch", "Job", "demo-r0"),
        ],
        "Pending",
        ("Normal", "PodsPending"),
        check_admitted,
    ),
    "resume: the user's suspend: false reaches the Job": Case(
        user_resumes,
        [
            ("patch-status", "FineTuneJob", "demo"),
            ("create", "ConfigMap", "demo-config"),
            ("create", "Service", "demo"),
            ("patch", "Job", "demo-r0"),
        ],
        "Suspended",
        None,
        check_resumed,
    ),
    "suspend: the user's suspend: true reaches the Job": Case(
        user_suspends,
        [("patch-status", "FineTuneJob", "demo"), ("patch", "Job", "demo-r0")],
        "Initializing",
        None,
        check_suspended,
    ),
    "release: the first gang starts once every rank has its pod": Case(
        lambda: (w := created(**GANG), w.gated_pods(suffix=""))[0],
        [("release", "Pod", "demo-r0-0"), ("release", "Pod", "demo-r0-1")],
        "Pending",
        None,
        check_first_gang,
    ),
    "release: not while a rank has no pod yet": Case(
        lambda: (w := created(**GANG), w.gated_pods(suffix="", ranks=(1,)))[0], [], "Pending"
    ),
    "restart in place: a retryable failure deletes the gang's pods, not its Job (writes no new Job)": Case(
        rank_failed,
        [*STATUS_AND_EVENT, ("delete", "Pod", "demo-r0-0")],
        "Restarting",
        ("Warning", "GangRestarting"),
        check_restarting,
    ),
    "restart in place: every rank failed: nothing to delete, the Job controller replaces them": Case(
        lambda: finished(ExitCode.INFRASTRUCTURE, "NCCL timeout"),
        STATUS_AND_EVENT,
        "Restarting",
        ("Warning", "GangRestarting"),
    ),
    "restart in place: a rank lost with its node is marked Failed (the Job controller replaces it), its peer deleted": Case(
        node_lost,
        [*STATUS_AND_EVENT, ("fail", "Pod", "demo-r0-1"), ("delete", "Pod", "demo-r0-0")],
        "Restarting",
        ("Warning", "NodeLost"),
        check_node_lost,
    ),
    "restart in place: a rank's pod deleted by someone else restarts the gang (torchrun takes no new rank)": Case(
        rank_deleted,
        [*STATUS_AND_EVENT, ("delete", "Pod", "demo-r0-0")],
        "Restarting",
        ("Warning", "GangRestarting"),
        lambda w: None if w.status["lastFailure"]["pod"] == "demo-r0-1" else pytest.fail(str(w.status)),
    ),
    "restart in place: ... also when only the Job controller's replacement shows it": Case(
        lambda: (
            w := running(**GANG),
            w.kube.objects.pop(("Pod", "ml", "demo-r0-1")),
            w.gated_pods(ranks=(1,)),
        )[0],
        [*STATUS_AND_EVENT, ("delete", "Pod", "demo-r0-0")],
        "Restarting",
        ("Warning", "GangRestarting"),
    ),
    "restart: a Job whose controller does not let its stopped pods go is replaced": Case(
        job_controller_stuck,
        [("patch-status", "FineTuneJob", "demo"), ("delete", "Job", "demo-r0")],
        "Restarting",
    ),
    "resume: the gang that went whole with the suspend starts again as the same generation, no restart": Case(
        lambda: (
            w := running(**GANG),
            w.set_job(suspend=False),
            [w.kube.objects.pop(("Pod", "ml", f"demo-r0-{i}")) for i in (0, 1)],
            w.gated_pods(),
        )[0],  # fmt: skip
        [
            *STATUS_AND_EVENT,
            ("release", "Pod", "demo-r0-0-b"),
            ("release", "Pod", "demo-r0-1-b"),
        ],
        "Pending",
        ("Normal", "PodsPending"),
        lambda w: None if w.status["restarts"] == 0 else pytest.fail(str(w.status)),
    ),
    "resume after a queue held the Job for minutes: its old Suspended condition is not a stuck Job controller": Case(
        resumed_after_a_long_hold,
        STATUS_AND_EVENT,  # no ("delete", "Job", "demo-r0"): that would queue the gang again
        "Pending",
        ("Normal", "PodsPending"),
    ),
    "restart in place: the next generation waits while the old one stops": Case(
        restarting,
        [("patch-status", "FineTuneJob", "demo")],
        "Restarting",  # usage: the old gang's pods stopped counting
    ),
    "restart in place: the next generation is released once the old one is gone": Case(
        old_gang_gone,
        [
            ("patch-status", "FineTuneJob", "demo"),
            ("release", "Pod", "demo-r0-0-b"),
            ("release", "Pod", "demo-r0-1-b"),
        ],
        "Restarting",
        None,
        check_next_gang,
    ),
    "restart: a failed Job cannot run the gang again: it is deleted": Case(
        job_failed,
        [*STATUS_AND_EVENT, ("delete", "Job", "demo-r0")],
        "Restarting",
        ("Warning", "GangRestarting"),
    ),
    "restart: ... and a new Job is created once its pods are gone": Case(
        job_failed_gang_gone,
        [
            ("create", "Job", "demo-r0"),
            ("create", "ConfigMap", "demo-config"),
            ("create", "Service", "demo"),
            ("patch-status", "FineTuneJob", "demo"),
        ],
        "Restarting",  # until its pods are released
        None,
        check_new_job_after_a_failed_one,
    ),
    "unschedulable: a gang not placed within scheduleTimeoutSeconds says why, once": Case(
        lambda: unschedulable(after=61),
        STATUS_AND_EVENT,
        "Pending",
        ("Warning", "Unschedulable"),
        check_unschedulable,
    ),
    "unschedulable: not before the timeout": Case(
        lambda: unschedulable(after=40), [], "Pending", None, check_not_yet_unschedulable
    ),
    "failure: a user error fails the job at once and stops the gang": Case(
        lambda: finished(ExitCode.DATASET_INVALID, "bad record 3"),
        [*STATUS_AND_EVENT, ("delete", "Job", "demo-r0")],
        "Failed",
        ("Warning", "DatasetInvalid"),
        check_failed_for_the_user,
    ),
    "failure: a rank that cannot reach a peer fails the job at once, naming both pods and the port": Case(
        lambda: finished(ExitCode.NETWORK_UNREACHABLE, UNREACHABLE, distributed={"nodes": 2}),
        [*STATUS_AND_EVENT, ("delete", "Job", "demo-r0")],
        "Failed",
        ("Warning", "NetworkUnreachable"),
        check_network_unreachable,
    ),
    "network check: rank 0's figures reach status.network": Case(
        network_checked, [("patch-status", "FineTuneJob", "demo")], "Initializing", None, check_network_status
    ),
    "failure: retries used up": Case(
        lambda: finished(ExitCode.STORAGE_UNAVAILABLE, runPolicy={"backoffLimit": 0}),
        [*STATUS_AND_EVENT, ("delete", "Job", "demo-r0")],
        "Failed",
        ("Warning", "BackoffLimitExceeded"),
    ),
    "failure: the active deadline passed": Case(
        deadline_passed,
        [*STATUS_AND_EVENT, ("delete", "Job", "demo-r0")],
        "Failed",
        ("Warning", "DeadlineExceeded"),
    ),
    "success: status and Event, the finished gang left for its logs": Case(
        lambda: (w := finished(0), w.job_condition("Complete"))[0],
        STATUS_AND_EVENT,
        "Succeeded",
        ("Normal", "TrainingSucceeded"),
        check_succeeded,
    ),
    "serving hand-off: a succeeded job's model is served in the pass that sees it succeed": Case(
        lambda: (w := finished(0, serving={}), w.job_condition("Complete"))[0],
        [*STATUS_AND_EVENT, ("create", "InferenceService", "demo"), *STATUS_AND_EVENT],
        "Succeeded",
        ("Normal", "ServingCreated"),
        check_serving,
    ),
    "serving hand-off: once": Case(
        lambda: (
            w := finished(0, serving={}),
            w.job_condition("Complete"),
            w.reconcile(),
            w.kube.forget_calls(),
        )[0],
        [],
        "Succeeded",
    ),
    "serving hand-off: no KServe is a condition, not a crash": Case(
        serving_without_kserve,
        [*STATUS_AND_EVENT, ("create", "InferenceService", "demo"), *STATUS_AND_EVENT],
        "Succeeded",
        ("Warning", "ServingAPIMissing"),
        check_serving_missing,
    ),
    "new run: trained fields edited after success close the run and remove its gang": Case(
        trained_fields_edited,
        [("delete", "Job", "demo-r0"), *STATUS_AND_EVENT],
        "Pending",
        ("Normal", runs.NEW_RUN_REASON),
        check_new_run,
    ),
    "new run: its gang, with this run's config": Case(
        new_run_gang_gone,
        [
            ("create", "Job", "demo-r0"),
            ("create", "ConfigMap", "demo-config"),
            ("patch", "ConfigMap", "demo-config"),
            ("create", "Service", "demo"),
            ("patch-status", "FineTuneJob", "demo"),
        ],
        "Pending",
        None,
        check_new_run_gang,
    ),
    "gang: the PodGroup before the Job": Case(
        lambda: World(new_job(scheduling={"gang": {"scheduler": "coscheduling"}})),
        [("create", "PodGroup", "demo"), *CREATE_GANG, *STATUS_AND_EVENT],
        "Pending",
        ("Normal", "PodsPending"),
        check_pod_group,
    ),
    "gang: no PodGroup CRD, no Job: a Warning naming the CRD, looked at again later": Case(
        lambda: World(new_job(scheduling={"gang": {"scheduler": "volcano"}}), unserved=("PodGroup",)),
        [("create", "PodGroup", "demo"), *STATUS_AND_EVENT],
        "Pending",
        ("Warning", "PodGroupCRDMissing"),
        check_pod_group_missing,
    ),
    "refused spec: Failed naming the field, nothing created": Case(
        lambda: World(new_job(training={"learningRate": -1})),
        STATUS_AND_EVENT,
        "Failed",
        ("Warning", "SpecInvalid"),
    ),
    "TTL: a finished job past ttlSecondsAfterFinished is deleted": Case(
        ttl_passed, [("delete", "FineTuneJob", "demo")], "", None, check_deleted
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_reconcile_pass(case: Case) -> None:
    world = case.given()
    before = copy.deepcopy(world.kube.objects)
    world.reconcile()
    assert world.kube.writes() == case.writes
    if case.phase:
        assert world.status.get("phase") == case.phase
    events = world.kube.events()
    assert [e[:2] for e in events][-1:] == ([case.event] if case.event else [])
    if case.then is not None:
        case.then(world)
    if not case.writes:
        assert world.kube.objects == before


def test_every_write_of_a_pass_is_needed_again_only_when_something_changes() -> None:
    """Level-triggered: after any pass of the table, a second pass over the same world writes nothing new
    (beyond the finished gang a restart or a new run waits for)."""
    world = World(new_job())
    for step in (world.reconcile, lambda: world.pods("Running"), world.reconcile):
        step()
    world.kube.forget_calls()
    world.reconcile()
    world.reconcile()
    assert world.kube.writes() == []


def test_the_store_keeps_no_copy_of_the_pod_template() -> None:
    """Every job's Job and Workload stay in memory: the pod template they carry (twice) is not kept, what the
    operator reads of them is."""
    from kubetune.controller.store import Store

    store = Store()
    template = {
        "metadata": {"labels": {"a": "b"}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
    }
    owner = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "j",
        "uid": "u1",
        "controller": True,
    }
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "j-r0", "namespace": "ns", "uid": "job-uid", "resourceVersion": "5",
                        "ownerReferences": [owner], "managedFields": [{"manager": "x"}],
                        "labels": {"kubetune.io/job-name": "j"}},
           "spec": {"suspend": True, "parallelism": 2, "podFailurePolicy": {"rules": []}, "template": template},
           "status": {"active": 0}}  # fmt: skip
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": "job-j-r0-abc", "namespace": "ns", "uid": "w", "resourceVersion": "6",
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "j-r0", "uid": "job-uid"}]},
                "spec": {"podSets": [{"name": "main", "count": 2, "template": template}]},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "message": "waiting"}]}}  # fmt: skip
    key = store.put_child("Job", job)
    assert key is not None
    assert store.put_child("Workload", workload) == key
    (kept,), _ = store.children(key)
    assert "template" not in kept["spec"] and "managedFields" not in kept["metadata"]
    assert kept["spec"] == {"suspend": True, "parallelism": 2, "podFailurePolicy": {"rules": []}}
    assert job["spec"]["template"] == template  # the caller's object is untouched
    wl = store.workload_of(key, kept)
    assert wl is not None and "spec" not in wl and wl["status"] == workload["status"]


def test_stored_objects_share_their_repeated_strings() -> None:
    """Thousands of stored jobs repeat the same keys and short values: the store keeps one copy of each."""
    import json

    from kubetune.controller.store import Store

    store = Store()
    raw = '{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "%s", "namespace": "ns", "uid": "%s"}, "spec": {"method": "lora"}, "status": {"phase": "Pending"}}'  # fmt: skip
    for name in ("a", "b"):
        assert store.put_ftj(json.loads(raw % (name, name + "-uid")))
    a, b = store.ftj(("ns", "a")), store.ftj(("ns", "b"))
    assert a is not None and b is not None and a["spec"] == b["spec"] == {"method": "lora"}
    key_a = next(k for k in a if k == "status")
    key_b = next(k for k in b if k == "status")
    assert key_a is key_b and a["status"]["phase"] is b["status"]["phase"]
