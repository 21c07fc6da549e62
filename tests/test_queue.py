"""Kueue in the status: a queued gang is Pending in Kueue's words (Admitted=False, QueuedByKueue), an admitted one
says which ClusterQueue admitted it; the store finds a Workload's FineTuneJob through its Job; a missing PodGroup
CRD is named once and creates no Job."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kubetune.api.models import FineTuneJobStatus
from kubetune.api.names import LABEL_JOB, LABEL_QUEUE
from kubetune.controller.store import Store
from kubetune.status.derive import Observed, derive, pod_group_missing
from kubetune.status.queue import queue_state
from operator_samples import spec

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
KUEUE_PENDING = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, 100m more needed"


def job(suspend: bool = True, queue: str | None = "team-a", uid: str = "job-uid-1") -> dict[str, Any]:
    labels = {LABEL_JOB: "demo"} | ({LABEL_QUEUE: queue} if queue else {})
    return {"metadata": {"name": "demo-r0", "namespace": "ml", "uid": uid, "labels": labels},
            "spec": {"suspend": suspend}, "status": {}}  # fmt: skip


def workload(
    admitted: bool = False, job_uid: str = "job-uid-1", evicted: str | None = None
) -> dict[str, Any]:
    conds = [{"type": "QuotaReserved", "status": "True" if admitted else "False", "reason": "QuotaReserved" if admitted else "Pending",
              "message": "Quota reserved in ClusterQueue cq" if admitted else KUEUE_PENDING}]  # fmt: skip
    if admitted:
        conds.append(
            {
                "type": "Admitted",
                "status": "True",
                "reason": "Admitted",
                "message": "The workload is admitted",
            }
        )
    if evicted:
        conds.append({"type": "Evicted", "status": "True", "reason": "Preempted", "message": evicted})
    status: dict[str, Any] = {"conditions": conds}
    if admitted:
        status["admission"] = {"clusterQueue": "cq"}
    refs = [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo-r0", "uid": job_uid, "controller": True}]
    return {"metadata": {"name": "job-demo-r0-abcde", "namespace": "ml", "uid": "wl-1", "resourceVersion": "5",
                         "ownerReferences": refs}, "status": status}  # fmt: skip


def conditions(status: FineTuneJobStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


def test_a_queued_gang_is_pending_in_kueues_words() -> None:
    d = derive(spec(), "demo", 1, FineTuneJobStatus(), Observed(job=job(), workload=workload()), NOW)
    assert d.status.phase == "Pending"
    assert KUEUE_PENDING in (d.status.message or "")
    status, reason, message = conditions(d.status)["Admitted"]
    assert (status, reason) == ("False", "QueuedByKueue") and KUEUE_PENDING in message and "team-a" in message
    assert d.event is not None and d.event[1] == "QueuedByKueue"


def test_before_kueue_makes_a_workload_the_gang_waits_for_it() -> None:
    d = derive(spec(), "demo", 1, FineTuneJobStatus(), Observed(job=job(), workload=None), NOW)
    assert d.status.phase == "Pending"
    assert conditions(d.status)["Admitted"][:2] == ("False", "QueuedByKueue")
    assert "no Kueue Workload" in conditions(d.status)["Admitted"][2]


def test_an_admitted_gang_says_which_cluster_queue_admitted_it() -> None:
    observed = Observed(job=job(suspend=False), workload=workload(admitted=True))
    old = FineTuneJobStatus(phase="Pending")
    d = derive(spec(), "demo", 1, old, observed, NOW)
    status, reason, message = conditions(d.status)["Admitted"]
    assert (status, reason) == ("True", "AdmittedByKueue") and "cq" in message


def test_kueue_rewording_a_wait_that_goes_on_writes_no_status() -> None:
    """Kueue rewrites its QuotaReserved message as the queue moves; the status keeps the words it first showed for
    the same wait (each rewrite was a status write per queued job), and takes new words when the wait changes."""
    first = derive(spec(), "demo", 1, FineTuneJobStatus(), Observed(job=job(), workload=None), NOW)
    untried = workload()  # a Workload Kueue has not tried to admit yet: no QuotaReserved condition
    untried["status"]["conditions"] = []
    waiting = derive(spec(), "demo", 1, first.status, Observed(job=job(), workload=untried), NOW)
    assert "waiting in the queue" in (waiting.status.message or "")
    queued = derive(spec(), "demo", 1, waiting.status, Observed(job=job(), workload=workload()), NOW)
    assert KUEUE_PENDING in (queued.status.message or "")  # no Workload -> Kueue's reason: new words
    reworded = workload()
    reworded["status"]["conditions"][0]["message"] = KUEUE_PENDING.replace("100m", "300m")
    again = derive(spec(), "demo", 1, queued.status, Observed(job=job(), workload=reworded), NOW)
    assert again.status == queued.status and again.event is None  # nothing to write
    admitted = derive(
        spec(), "demo", 1, queued.status, Observed(job=job(), workload=workload(admitted=True)), NOW
    )
    assert conditions(admitted.status)["Admitted"][:2] == (
        "True",
        "AdmittedByKueue",
    )  # the wait ended: new words


def test_admitted_before_kueue_unsuspends_the_job_is_still_pending_not_suspended() -> None:
    """Kueue admits the Workload, then unsuspends the Job: in between the job is Pending (it was shown Suspended,
    a phase change there and back, and a status write, for every queued job: bench/kueue_scale.py saw it)."""
    observed = Observed(job=job(suspend=True), workload=workload(admitted=True))
    d = derive(spec(), "demo", 1, FineTuneJobStatus(phase="Pending"), observed, NOW)
    assert d.status.phase == "Pending"
    assert conditions(d.status)["Admitted"][:2] == ("True", "AdmittedByKueue")
    assert "cq" in (d.status.message or "")


def test_a_job_the_user_suspends_in_a_queue_is_suspended() -> None:
    observed = Observed(job=job(suspend=True), workload=workload(admitted=True))
    d = derive(
        spec(**{"runPolicy": {"suspend": True}}), "demo", 1, FineTuneJobStatus(phase="Running"), observed, NOW
    )
    assert d.status.phase == "Suspended"


def test_a_suspended_job_outside_any_queue_is_suspended_without_an_admitted_condition() -> None:
    d = derive(spec(), "demo", 1, FineTuneJobStatus(), Observed(job=job(queue=None)), NOW)
    assert d.status.phase == "Suspended"
    assert "Admitted" not in conditions(d.status)


def test_queue_state_reads_kueues_eviction() -> None:
    state = queue_state(
        job(suspend=False), workload(admitted=True, evicted="Preempted to accommodate a workload")
    )
    assert state is not None and state.evicted == "Preempted to accommodate a workload"


PREEMPTED = ("Preempted to accommodate a workload (UID: wl-2, JobUID: job-uid-2) due to prioritization in the "
             "ClusterQueue; preemptor path: /cq; preemptee path: /cq")  # fmt: skip


def test_a_gang_kueue_preempts_is_pending_evicted_in_kueues_words_until_admitted_again() -> None:
    """A higher-priority Workload preempted this one: Kueue sets Evicted=True (Preempted) and suspends the Job; the
    job is Pending with Kueue's reason and words (a Warning Event), through the whole wait (Kueue's queue messages
    change, the status does not), and Admitted again once Kueue readmits it (Evicted=False)."""
    running = FineTuneJobStatus(phase="Running")
    stopping = Observed(job=job(suspend=True), workload=workload(admitted=True, evicted=PREEMPTED))
    d = derive(spec(), "demo", 1, running, stopping, NOW)
    assert d.status.phase == "Pending"
    assert d.status.message is not None and d.status.message.startswith(
        f"Evicted by Kueue (Preempted): {PREEMPTED}."
    )
    assert "team-a" in d.status.message and "resumes from its newest checkpoint" in d.status.message
    assert conditions(d.status)["Admitted"] == ("False", "EvictedByKueue", d.status.message)
    assert d.event == ("Warning", "EvictedByKueue", d.status.message)
    # its pods gone, Kueue released the quota (QuotaReserved False with the eviction's words, then its queue's)
    requeued = workload(evicted=PREEMPTED)
    again = derive(spec(), "demo", 1, d.status, Observed(job=job(suspend=True), workload=requeued), NOW)
    assert again.status == d.status and again.event is None
    readmitted = workload(admitted=True)
    readmitted["status"]["conditions"].append({"type": "Evicted", "status": "False", "reason": "QuotaReserved",
                                               "message": f"Previously: {PREEMPTED}"})  # fmt: skip
    back = derive(spec(), "demo", 1, again.status, Observed(job=job(suspend=False), workload=readmitted), NOW)
    assert conditions(back.status)["Admitted"][:2] == ("True", "AdmittedByKueue")
    assert "Evicted" not in (back.status.message or "")


def test_while_kueue_evicts_a_running_gang_its_admitted_condition_says_so() -> None:
    """Evicted, the Job not suspended yet: still Running (its pods are), Admitted=False in Kueue's words."""
    observed = Observed(job=job(suspend=False), workload=workload(admitted=True, evicted=PREEMPTED))
    d = derive(spec(), "demo", 1, FineTuneJobStatus(phase="Running"), observed, NOW)
    assert conditions(d.status)["Admitted"][:2] == ("False", "EvictedByKueue")


def test_the_users_suspend_of_an_evicted_job_is_a_suspend() -> None:
    observed = Observed(job=job(suspend=True), workload=workload(admitted=True, evicted=PREEMPTED))
    d = derive(
        spec(**{"runPolicy": {"suspend": True}}), "demo", 1, FineTuneJobStatus(phase="Running"), observed, NOW
    )
    assert d.status.phase == "Suspended"


def test_queue_state_reads_the_reason_of_kueues_eviction() -> None:
    state = queue_state(job(), workload(admitted=True, evicted=PREEMPTED))
    assert state is not None and (state.evicted_reason, state.evicted) == ("Preempted", PREEMPTED)
    assert queue_state(job(), workload(admitted=True)).evicted_reason is None  # type: ignore[union-attr]


def test_the_store_finds_a_workloads_finetunejob_through_its_job() -> None:
    store = Store()
    assert store.put_child("Job", job()) == ("ml", "demo")
    assert store.put_child("Workload", workload()) == ("ml", "demo")
    assert store.workload_of(("ml", "demo"), job()) is not None
    assert store.workload_of(("ml", "demo"), job(uid="another")) is None


def test_a_workload_seen_before_its_job_is_kept_until_the_job_comes() -> None:
    store = Store()
    assert store.put_child("Workload", workload()) is None  # no Job of ours known yet
    store.put_child("Job", job())
    assert store.workload_of(("ml", "demo"), job()) is not None


def test_workloads_of_other_owners_are_not_ours() -> None:
    store = Store()
    store.put_child("Job", job())
    assert store.put_child("Workload", workload(job_uid="someone-elses-job")) is None
    assert store.workload_of(("ml", "demo"), job()) is None


def test_a_deleted_job_takes_its_workload_from_the_store() -> None:
    store = Store()
    store.put_child("Job", job())
    store.put_child("Workload", workload())
    store.drop_child("Job", job())
    assert store.workloads == {}


def test_a_missing_pod_group_crd_is_named_and_warned_once() -> None:
    gang_spec = spec(scheduling={"gang": {"scheduler": "volcano"}})
    first = pod_group_missing(FineTuneJobStatus(), "podgroups.scheduling.volcano.sh", gang_spec, 1, NOW)
    assert first["status"].phase == "Pending"
    status, reason, message = conditions(first["status"])["PodGroupReady"]
    assert (status, reason) == (
        "False",
        "PodGroupCRDMissing",
    ) and "podgroups.scheduling.volcano.sh" in message
    assert first["event"] is not None and first["event"][0] == "Warning"
    again = pod_group_missing(first["status"], "podgroups.scheduling.volcano.sh", gang_spec, 1, NOW)
    assert again["event"] is None


def test_a_job_with_a_gang_reports_its_pod_group() -> None:
    gang_spec = spec(scheduling={"gang": {"scheduler": "coscheduling"}})
    d = derive(gang_spec, "demo", 1, FineTuneJobStatus(), Observed(job=job(suspend=False, queue=None)), NOW)
    assert conditions(d.status)["PodGroupReady"][:2] == ("True", "PodGroupCreated")
