"""Status derivation: phase, conditions, restarts and artifacts from what the operator observed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from kubetune.api.contract import TrainerPhase
from kubetune.api.models import FailureInfo, FineTuneJobStatus, Progress
from kubetune.status.conditions import set_condition
from kubetune.status.derive import Observed, decisive_failure, derive, refused_status, ttl_expired
from operator_samples import spec

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def job(suspend=False, conditions=()):
    return {
        "metadata": {"name": "demo-r0"},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": "R", "message": "m"} for t in conditions]
        },
    }


def pod(
    name="demo-r0-0",
    phase="Running",
    node="n1",
    exit_code=None,
    message="",
    finished="2025-01-01T11:00:00Z",
    started=NOW - timedelta(seconds=5),
):
    status: dict = {"phase": phase}
    if exit_code is not None:
        term = {"exitCode": exit_code, "message": message, "finishedAt": finished, "reason": "Error"}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    elif phase == "Running":
        running = {"startedAt": started.strftime("%Y-%m-%dT%H:%M:%SZ")}
        status["containerStatuses"] = [{"name": "trainer", "state": {"running": running}}]
    index = name.rsplit("-", 1)[-1]
    annotations = {"batch.kubernetes.io/job-completion-index": index}
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"nodeName": node},
        "status": status,
    }


def run(observed, old=None, **spec_overrides):
    typed = FineTuneJobStatus.from_stored(old) if isinstance(old, dict) or old is None else old
    return derive(spec(**spec_overrides), "demo", 1, typed, observed, NOW)


def condition(status, type_):
    return next(c for c in status.conditions if c.type == type_)


def test_missing_job_is_created_and_pending():
    d = run(Observed(job=None))
    assert d.action == "create" and d.status.phase == "Pending"


def test_restart_waits_for_the_old_gang_to_be_gone():
    d = run(Observed(job=None, stale=2), old={"phase": "Restarting", "restarts": 1})
    assert d.action == "none" and d.status.phase == "Restarting"


def test_unscheduled_pods_are_pending():
    d = run(Observed(job=job(), pods=[pod(phase="Pending", node=None)]))
    assert d.status.phase == "Pending"


def test_scheduled_but_not_all_running_is_initializing():
    d = run(Observed(job=job(), pods=[pod(), pod("demo-r0-1", phase="Pending")]), distributed={"nodes": 2})
    assert d.status.phase == "Initializing"


def test_all_pods_running_is_running():
    d = run(
        Observed(job=job(), pods=[pod()], progress=Progress(step=0, total_steps=10, trainer_phase="Training"))
    )
    assert d.status.phase == "Running"
    assert condition(d.status, "Running").status == "True"


def test_pods_up_before_the_trainer_reports_are_initializing():
    d = run(Observed(job=job(), pods=[pod()]), old={"phase": "Pending"})
    assert d.status.phase == "Initializing"


def test_running_never_steps_back_when_one_progress_read_fails():
    d = run(Observed(job=job(), pods=[pod()]), old={"phase": "Running"})
    assert d.status.phase == "Running"


def test_progress_never_readable_is_running_after_a_grace_period():
    long_ago = NOW - timedelta(seconds=600)
    d = run(Observed(job=job(), pods=[pod(started=long_ago)]), old={"phase": "Initializing"})
    assert d.status.phase == "Running" and d.status.message == "All 1 pod(s) are running."


def test_trainer_still_initializing_is_initializing():
    """The phase rank 0 reports before its first step (the trainer's own TrainerPhase, not a guess)."""
    d = run(
        Observed(job=job(), pods=[pod()], progress=Progress(trainer_phase=TrainerPhase.INITIALIZING.value))
    )
    assert d.status.phase == "Initializing"


def test_progress_is_written_and_named_in_the_message():
    p = Progress(step=50, total_steps=200, percent=25.0, loss=1.5, trainer_phase="Training")
    d = run(Observed(job=job(), pods=[pod()], progress=p))
    assert d.status.progress.step == 50 and d.status.progress.total_steps == 200
    assert d.status.message == "Training: step 50 of 200 (25.0%)."


def test_complete_job_succeeds_with_artifacts():
    d = run(Observed(job=job(conditions=["Complete"]), pods=[pod(phase="Succeeded")]))
    assert d.status.phase == "Succeeded"
    assert d.status.artifacts.adapter == "s3://out/demo/adapter/"
    assert d.status.artifacts.merged_model == "s3://out/demo/model/"
    assert d.status.artifacts.metrics == "s3://out/demo/metrics.json"
    assert condition(d.status, "Succeeded").status == "True"


def test_success_takes_the_final_progress_from_rank_0s_termination_message():
    final = {"step": 160, "totalSteps": 160, "loss": 0.02, "evalLoss": 0.03, "phase": "Succeeded"}
    msg = json.dumps(
        {"exitCode": 0, "reason": "Succeeded", "message": "training finished", "progress": final}
    )
    rank0 = pod("demo-r0-0", phase="Succeeded", exit_code=0, message=msg)
    rank1 = pod("demo-r0-1", phase="Succeeded", exit_code=0, message="")
    old = {"phase": "Running", "progress": {"step": 159, "totalSteps": 160, "percent": 99.4}}
    d = run(
        Observed(job=job(conditions=["Complete"]), pods=[rank1, rank0]), old=old, distributed={"nodes": 2}
    )
    assert d.status.phase == "Succeeded"
    assert d.status.progress.step == 160 and d.status.progress.percent == 100.0
    assert d.status.progress.eval_loss == 0.03 and d.status.progress.trainer_phase == "Succeeded"


def test_success_without_a_final_message_keeps_the_last_polled_progress():
    old = {"phase": "Running", "progress": {"step": 159, "totalSteps": 160}}
    d = run(Observed(job=job(conditions=["Complete"]), pods=[pod(phase="Succeeded", exit_code=0)]), old=old)
    assert d.status.phase == "Succeeded" and d.status.progress.step == 159


def test_full_fine_tune_has_no_adapter_artifact():
    d = run(Observed(job=job(conditions=["Complete"])), method="full")
    assert d.status.artifacts is not None and d.status.artifacts.adapter is None


def test_retryable_failure_restarts_the_gang():
    d = run(Observed(job=job(conditions=["Failed"]), pods=[pod(phase="Failed", exit_code=75)]))
    assert d.action == "restart" and d.status.phase == "Restarting"
    # the same Job: the gang restarts in place
    assert d.status.restarts == 1 and d.status.workload == "demo-r0"
    assert d.status.last_failure == FailureInfo(
        pod="demo-r0-0", exit_code=75, reason="InfrastructureError", message=""
    )


def test_user_error_fails_at_once():
    d = run(Observed(job=job(), pods=[pod(phase="Failed", exit_code=65)]))
    assert d.action == "stop" and d.status.phase == "Failed"
    assert condition(d.status, "Failed").reason == "ModelNotFound"


def test_trainer_termination_message_overrides_torchrun_exit_code():
    msg = json.dumps({"exitCode": 66, "reason": "DatasetInvalid", "message": "line 3: no 'messages' column"})
    d = run(Observed(job=job(), pods=[pod(phase="Failed", exit_code=1, message=msg)]))
    assert d.status.phase == "Failed"
    assert "line 3: no 'messages' column" in d.status.message
    assert d.status.last_failure.exit_code == 66


def test_backoff_limit_exhausted_fails_with_the_last_reason_and_code():
    d = run(
        Observed(job=job(), pods=[pod(phase="Failed", exit_code=76)]),
        old={"restarts": 2},
        runPolicy={"backoffLimit": 2},
    )
    assert d.status.phase == "Failed" and d.action == "stop"
    cond = condition(d.status, "Failed")
    assert cond.reason == "BackoffLimitExceeded"
    assert "StorageUnavailable, exit code 76" in cond.message


def test_user_error_on_any_rank_decides_over_an_earlier_infrastructure_error():
    pods = [
        pod("a", phase="Failed", exit_code=75, finished="2025-01-01T10:00:00Z"),
        pod("b", phase="Failed", exit_code=64, finished="2025-01-01T10:00:05Z"),
    ]
    failure = decisive_failure(pods)
    assert failure is not None and failure.pod == "b"


def test_earliest_retryable_failure_is_the_cause():
    pods = [
        pod("late", phase="Failed", exit_code=143, finished="2025-01-01T10:00:05Z"),
        pod("first", phase="Failed", exit_code=75, finished="2025-01-01T10:00:00Z"),
    ]
    failure = decisive_failure(pods)
    assert failure is not None and failure.pod == "first"


def test_evicted_pod_without_container_status_is_retryable():
    evicted = {
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "reason": "Evicted", "message": "node low on memory"},
    }
    d = run(Observed(job=job(), pods=[evicted]))
    assert d.action == "restart"


def test_suspended_job_is_suspended():
    d = run(Observed(job=job(suspend=True), pods=[]))
    assert d.status.phase == "Suspended"
    assert condition(d.status, "Suspended").status == "True"


def test_resumed_job_flips_suspended_condition_to_false():
    old = run(Observed(job=job(suspend=True))).status
    d = run(Observed(job=job(), pods=[pod()]), old=old)
    assert condition(d.status, "Suspended").status == "False"
    assert condition(d.status, "Suspended").reason == "JobResumed"


def test_deadline_exceeded_fails_and_stops():
    old = {"phase": "Running", "startTime": "2025-01-01T10:00:00Z"}
    d = run(Observed(job=job(), pods=[pod()]), old=old, runPolicy={"activeDeadlineSeconds": 3600})
    assert d.status.phase == "Failed" and d.action == "stop"
    assert condition(d.status, "Failed").reason == "DeadlineExceeded"


def test_terminal_phase_stays():
    d = run(Observed(job=None), old={"phase": "Succeeded"})
    assert d.status.phase == "Succeeded" and d.action == "none"


def test_event_only_on_phase_change():
    first = run(Observed(job=job(), pods=[pod()]))
    again = run(Observed(job=job(), pods=[pod()]), old=first.status)
    assert first.event is not None and first.event[0] == "Normal"
    assert again.event is None


def test_observed_generation_is_recorded():
    d = run(Observed(job=job(), pods=[pod()]))
    assert d.status.observed_generation == 1
    assert all(c.observed_generation == 1 for c in d.status.conditions)


def test_transition_time_moves_only_when_status_flips():
    conds = set_condition([], "Running", True, "A", "a", "t1", 1)
    conds = set_condition(conds, "Running", True, "B", "b", "t2", 1)
    assert conds[0].last_transition_time == "t1" and conds[0].reason == "B"
    conds = set_condition(conds, "Running", False, "C", "c", "t3", 1)
    assert conds[0].last_transition_time == "t3"


def test_refused_spec_is_failed_with_spec_valid_false():
    s = refused_status(None, ["spec.training.evalSteps: needs evaluation data"], 2, NOW)
    assert s.phase == "Failed"
    valid = condition(s, "SpecValid")
    assert valid.status == "False" and valid.reason == "SpecInvalid"
    assert "spec.training.evalSteps" in valid.message


def test_ttl_expires_after_finish():
    finished = {
        "phase": "Succeeded",
        "completionTime": (NOW - timedelta(seconds=61)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    finished = FineTuneJobStatus.from_stored(finished)
    assert ttl_expired(spec(runPolicy={"ttlSecondsAfterFinished": 60}), finished, NOW)
    assert not ttl_expired(spec(runPolicy={"ttlSecondsAfterFinished": 120}), finished, NOW)
    assert not ttl_expired(spec(), finished, NOW)


def test_a_gang_restarts_in_place_only_in_a_job_that_can_run_it_again():
    """In place: a Job of this operator (it ignores pod failures), not failed, no index finished. Otherwise the
    operator deletes the Job and creates a new one (a Job an older operator made has no podFailurePolicy: its
    failed pod has already failed it)."""
    from kubetune.status.derive import in_place

    ours = {**job(), "spec": {"podFailurePolicy": {"rules": []}, "parallelism": 2}}
    assert in_place(ours, [pod(phase="Failed", exit_code=75)], 2)
    assert not in_place(job(), [], 2)  # an older operator's Job
    assert not in_place({**ours, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, [], 2)
    assert not in_place({**ours, "status": {"completedIndexes": "0"}}, [], 2)
    assert not in_place(ours, [pod(phase="Succeeded", exit_code=0)], 2)
    assert not in_place(ours, [], 1)  # an elastic gang shrinking to one node


def test_a_job_its_controller_no_longer_updates_is_seen():
    """Kubernetes 1.32's Job controller, after a quick suspend and resume, fails every status update ("startTime
    cannot be removed for unsuspended job"): the Job stays Suspended in its status, its stopped pods keep their
    tracking finalizer. Past a minute of either, the operator replaces the Job."""
    from kubetune.status.derive import job_stuck

    resumed = {"metadata": {"name": "demo-r0"}, "spec": {"suspend": False}, "status": {"conditions": [
        {"type": "Suspended", "status": "True", "lastTransitionTime": "2025-01-01T11:58:30Z"}]}}  # fmt: skip
    assert job_stuck(resumed, [], NOW) == "Job demo-r0 resumed but still Suspended"
    assert job_stuck({**resumed, "spec": {"suspend": True}}, [], NOW) is None  # suspended: as it should be
    recent = {**resumed, "status": {"conditions": [
        {"type": "Suspended", "status": "True", "lastTransitionTime": "2025-01-01T11:59:30Z"}]}}  # fmt: skip
    assert job_stuck(recent, [], NOW) is None  # the controller may just not have caught up yet
    # a queue held the Job for minutes and resumed it a moment ago (Kueue after a preemption): not stuck yet
    assert job_stuck(resumed, [], NOW, resumed_seen=NOW - timedelta(seconds=5)) is None
    assert job_stuck(resumed, [], NOW, resumed_seen=NOW - timedelta(seconds=61)) is not None
    stopped = pod(phase="Failed", exit_code=143, finished="2025-01-01T11:58:00Z")
    stopped["metadata"] |= {
        "deletionTimestamp": "2025-01-01T11:58:00Z",
        "finalizers": ["batch.kubernetes.io/job-tracking"],
    }
    assert job_stuck(job(), [stopped], NOW) == "pod demo-r0-0 stopped but not let go"
    assert (
        job_stuck(job(), [pod(phase="Failed", exit_code=143, finished="2025-01-01T11:58:00Z")], NOW) is None
    )
