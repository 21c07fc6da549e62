"""GitOps edits after a job finished: which edits start a new run, and what the new run's status says."""

from __future__ import annotations

from datetime import datetime, timezone

from kubetune.api.models import FineTuneJobStatus
from kubetune.status.runs import for_run, needs_new_run, run_uri, start_new_run, trained_hash
from operator_samples import spec

NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)


def finished(s, **extra) -> FineTuneJobStatus:
    return FineTuneJobStatus.from_stored({"phase": "Succeeded", "message": "done", "observedGeneration": 1, "runGeneration": 1, "trainedSpecHash": trained_hash(s),
            "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:00:00Z", "restarts": 1,
            "runUri": "s3://out/demo", "artifacts": {"adapter": "s3://out/demo/adapter/"}, "progress": {"step": 60},
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingSucceeded", "message": "",
                            "lastTransitionTime": "2026-01-01T01:00:00Z"}], **extra})  # fmt: skip


def test_an_edit_of_what_is_trained_after_the_job_finished_starts_a_new_run():
    old = spec(training={"maxSteps": 60})
    assert not needs_new_run(old, finished(old))
    assert needs_new_run(spec(training={"maxSteps": 80}), finished(old))
    assert needs_new_run(spec(dataset={"train": "s3://data/other.jsonl"}), finished(old))


def test_an_edit_of_any_trained_field_starts_a_new_run():
    old = spec(method="prompt_tuning", promptTuning={"numVirtualTokens": 8})
    assert not needs_new_run(
        spec(method="prompt_tuning", promptTuning={"numVirtualTokens": 8}), finished(old)
    )
    assert needs_new_run(spec(method="prompt_tuning", promptTuning={"numVirtualTokens": 16}), finished(old))
    prefix = spec(method="prefix_tuning", prefixTuning={"numVirtualTokens": 8})
    assert needs_new_run(spec(method="prefix_tuning", prefixTuning={"numVirtualTokens": 4}), finished(prefix))


def test_an_edit_of_a_later_output_field_starts_a_new_run():
    old = spec(dataset={"train": "s3://data/train.jsonl", "evalSplit": 0.1})
    mixed = spec(
        dataset={"train": "s3://data/train.jsonl", "evalSplit": 0.1},
        output={"uri": "s3://out/demo", "interpolate": [0.5]},
    )
    assert needs_new_run(mixed, finished(old))


def test_edits_that_train_nothing_new_start_no_run():
    old = spec(training={"maxSteps": 60})
    assert not needs_new_run(
        spec(training={"maxSteps": 60}, runPolicy={"ttlSecondsAfterFinished": 60}), finished(old)
    )
    assert not needs_new_run(
        spec(training={"maxSteps": 60}, output={"uri": "s3://out/demo", "resumeFrom": "previous"}),
        finished(old),
    )


def test_no_new_run_while_active_or_without_a_recorded_fingerprint():
    old = spec(training={"maxSteps": 60})
    assert not needs_new_run(spec(training={"maxSteps": 80}), finished(old, phase="Running"))
    assert not needs_new_run(spec(training={"maxSteps": 80}), finished(old, trainedSpecHash=None))


def test_the_new_run_records_the_old_one_and_starts_pending_at_its_own_prefix():
    old = spec(training={"maxSteps": 60})
    new = spec(training={"maxSteps": 80}, output={"uri": "s3://out/demo", "resumeFrom": "previous"})
    typed, event = start_new_run(new, 2, finished(old), NOW)
    status = typed.to_patch()
    assert status["phase"] == "Pending" and status["observedGeneration"] == 2 and status["run"] == 2
    assert status["runUri"] == "s3://out/demo/run-2" and status["resumedFrom"] == "s3://out/demo"
    assert status["restarts"] == 0 and status["progress"] is None and status["artifacts"] is None
    assert status["trainedSpecHash"] == trained_hash(new)
    [record] = status["runs"]
    assert record == {"run": 1, "generation": 1, "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:00:00Z",
                      "outcome": "Succeeded", "message": "done", "uri": "s3://out/demo",
                      "artifacts": {"adapter": "s3://out/demo/adapter/"}}  # fmt: skip
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "False" and succeeded["reason"] == "NewRun"
    assert event[1] == "NewRun" and "resuming from run 1" in event[2]


def test_a_fresh_new_run_resumes_from_nothing():
    old = spec(training={"maxSteps": 60})
    status, event = start_new_run(spec(training={"maxSteps": 80}), 2, finished(old), NOW)
    assert status.resumed_from is None and "from the start" in event[2]


def test_each_run_after_the_first_writes_to_its_own_prefix():
    s = spec()
    assert (
        run_uri("s3://out/demo/", 1) == "s3://out/demo/"
        and run_uri("s3://out/demo/", 3) == "s3://out/demo/run-3"
    )
    assert for_run(s, FineTuneJobStatus(run=1)).output.uri == s.output.uri
    assert for_run(s, FineTuneJobStatus(run=2)).output.uri == "s3://out/demo/run-2"


def test_the_model_card_block_is_no_new_training():
    old = spec(training={"maxSteps": 60})
    card = {"uri": "s3://out/demo", "card": {"license": "apache-2.0", "tags": ["digits"]}}
    assert not needs_new_run(spec(training={"maxSteps": 60}, output=card), finished(old))


def test_usage_goes_on_into_the_new_run_without_the_idle_time_and_tracking_starts_afresh():
    old = spec(training={"maxSteps": 60})
    usage = {"wallSeconds": 3600.0, "gpuSeconds": 100.0, "runningPods": 0, "updatedAt": "2026-01-01T01:00:00Z",
             "runs": [{"run": 1, "wallSeconds": 3600.0, "gpuSeconds": 100.0}]}  # fmt: skip
    status, _ = start_new_run(
        spec(training={"maxSteps": 80}),
        2,
        finished(old, usage=usage, tracking={"mlflowRun": "http://m/#/r"}),
        NOW,
    )
    assert (
        status.usage is not None
        and status.usage.wall_seconds == 3600.0
        and status.usage.updated_at == "2026-01-02T00:00:00Z"
    )
    assert status.to_patch()["tracking"] is None  # removed by the merge patch
