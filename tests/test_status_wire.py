"""The status the operator writes, byte for byte: what derive, refused_status and start_new_run put on the
wire for representative inputs. status_wire.json was recorded from the operator before the status became
the typed FineTuneJobStatus; the CRD schema, kubectl's columns, the SDK and the e2e suite read this shape.

An intended change of the wire format: KUBETUNE_RECORD_WIRE=1 pytest tests/test_status_wire.py rewrites
the file; review its diff.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.models import FineTuneJobStatus, Progress
from kubetune.status.derive import Observed, derive, refused_status
from kubetune.status.runs import start_new_run, trained_hash
from operator_samples import spec
from test_status import NOW, job, pod

GOLDEN = Path(__file__).with_name("status_wire.json")


def wire(status: FineTuneJobStatus) -> dict[str, Any]:
    return status.to_patch()


def old(raw: dict[str, Any] | None) -> FineTuneJobStatus:
    return FineTuneJobStatus.from_stored(raw)


RUNNING = {
    "phase": "Running",
    "message": "Training: step 3 of 10 (30.0%).",
    "observedGeneration": 2,
    "restarts": 1,
    "workload": "demo-r1",
    "startTime": "2025-01-01T11:00:00Z",
    "run": 2,
    "runUri": "s3://out/demo/run-2",
    "runGeneration": 2,
    "trainedSpecHash": "0123456789abcdef",
    "resumedFrom": "s3://out/demo",
    "kopf": {"progress": {}},
    "lastFailure": {
        "pod": "demo-r0-1",
        "exitCode": 75,
        "reason": "InfrastructureError",
        "message": "node lost",
    },
    "progress": {
        "step": 3,
        "totalSteps": 10,
        "percent": 30.0,
        "loss": 1.25,
        "trainerPhase": "Training",
        "updatedAt": "2025-01-01T11:59:00Z",
    },  # fmt: skip
    "conditions": [
        {
            "type": "SpecValid",
            "status": "True",
            "reason": "SpecAccepted",
            "message": "The spec is valid.",
            "lastTransitionTime": "2025-01-01T11:00:00Z",
            "observedGeneration": 2,
        },  # fmt: skip
        {
            "type": "Running",
            "status": "True",
            "reason": "TrainingRunning",
            "message": "Training: step 3 of 10 (30.0%).",
            "lastTransitionTime": "2025-01-01T11:10:00Z",
            "observedGeneration": 2,
        },  # fmt: skip
        {
            "type": "Suspended",
            "status": "False",
            "reason": "JobResumed",
            "message": "Resumed.",
            "lastTransitionTime": "2025-01-01T11:05:00Z",
        },  # fmt: skip
    ],
    "runs": [
        {
            "run": 1,
            "generation": 1,
            "startTime": "2025-01-01T09:00:00Z",
            "completionTime": "2025-01-01T10:00:00Z",
            "outcome": "Succeeded",
            "message": "done",
            "uri": "s3://out/demo",
            "artifacts": {"adapter": "s3://out/demo/adapter/"},
        }
    ],  # fmt: skip
}

PROGRESS = Progress(step=4, total_steps=10, epoch=0.4, loss=1.1, eval_loss=1.3, learning_rate=1e-4, tokens_per_second=900.5,
                    eta_seconds=60.0, percent=40.0, eta="1m00s", trainer_phase="Training", data_warning="2% truncated",
                    updated_at="2025-01-01T12:00:00Z")  # fmt: skip
FINAL = json.dumps({"exitCode": 0, "reason": "Succeeded", "message": "training finished",
                    "progress": {"step": 10, "totalSteps": 10, "loss": 0.5, "evalLoss": 0.6, "phase": "Succeeded"}})  # fmt: skip
FAILED_JOB = {"metadata": {"name": "demo-r1"}, "spec": {},
              "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}}  # fmt: skip
EVICTED = {
    "metadata": {"name": "demo-r1-0"},
    "status": {"phase": "Failed", "reason": "Evicted", "message": "node low on memory"},
}
LONG_AGO = NOW - timedelta(seconds=600)


def _derive(
    old_status: dict[str, Any] | None, observed: Observed, generation: int | None = 2, **spec_overrides: Any
) -> Any:
    return derive(spec(**spec_overrides), "demo", generation, old(old_status), observed, NOW).status


def scenarios() -> dict[str, Any]:
    finished = {k: v for k, v in RUNNING.items() if k != "kopf"} | {
        "phase": "Succeeded", "completionTime": "2025-01-01T11:30:00Z", "trainedSpecHash": trained_hash(spec())}  # fmt: skip
    suspended = _derive(None, Observed(job=job(suspend=True)), runPolicy={"suspend": True})
    return {
        "new job": lambda: _derive(None, Observed(job=None)),
        "new job, no generation": lambda: _derive(None, Observed(job=None), generation=None),
        "suspended before its Job exists": lambda: _derive(
            None, Observed(job=None), runPolicy={"suspend": True}
        ),
        "restart waits for the old gang": lambda: _derive(
            RUNNING | {"phase": "Restarting", "message": "Rank failed"}, Observed(job=None, stale=2)
        ),
        "unscheduled pods": lambda: _derive(
            None, Observed(job=job(), pods=[pod(phase="Pending", node=None)])
        ),
        "some pods up": lambda: _derive(
            None,
            Observed(job=job(), pods=[pod(), pod("demo-r0-1", phase="Pending")]),
            distributed={"nodes": 2},
        ),
        "pods up, trainer silent": lambda: _derive({"phase": "Pending"}, Observed(job=job(), pods=[pod()])),
        "trainer silent past the grace": lambda: _derive(
            {"phase": "Initializing"}, Observed(job=job(), pods=[pod(started=LONG_AGO)])
        ),
        "trainer initializing": lambda: _derive(
            None, Observed(job=job(), pods=[pod()], progress=Progress(trainer_phase="Initializing"))
        ),
        "running with progress": lambda: _derive(
            RUNNING, Observed(job=job(), pods=[pod()], progress=PROGRESS)
        ),
        "running, one read failed": lambda: _derive(RUNNING, Observed(job=job(), pods=[pod()])),
        "succeeded with the final progress": lambda: _derive(
            RUNNING,
            Observed(
                job=job(conditions=["Complete"]),
                pods=[
                    pod("demo-r0-1", phase="Succeeded", exit_code=0),
                    pod(phase="Succeeded", exit_code=0, message=FINAL),
                ],
            ),
            distributed={"nodes": 2},
        ),
        "succeeded, full fine-tune": lambda: _derive(
            None, Observed(job=job(conditions=["SuccessCriteriaMet"])), method="full"
        ),
        "retryable failure restarts": lambda: _derive(
            RUNNING, Observed(job=job(), pods=[pod(phase="Failed", exit_code=75, message="disk")])
        ),
        "evicted pod restarts": lambda: _derive(None, Observed(job=job(), pods=[EVICTED])),
        "failed Job without a failed pod": lambda: _derive(None, Observed(job=FAILED_JOB)),
        "user error fails": lambda: _derive(
            RUNNING, Observed(job=job(), pods=[pod(phase="Failed", exit_code=65)])
        ),
        "backoff limit exceeded": lambda: _derive(
            RUNNING,
            Observed(job=job(), pods=[pod(phase="Failed", exit_code=76)]),
            runPolicy={"backoffLimit": 1},
        ),
        "deadline exceeded": lambda: _derive(
            RUNNING, Observed(job=job(), pods=[pod()]), runPolicy={"activeDeadlineSeconds": 60}
        ),
        "suspended Job": lambda: _derive(RUNNING, Observed(job=job(suspend=True))),
        "resumed": lambda: _derive(wire(suspended), Observed(job=job(), pods=[pod()])),
        "finished stays": lambda: _derive(finished, Observed(job=None)),
        "refused, new": lambda: refused_status(
            None, ["spec.training.evalSteps: needs evaluation data"], 1, NOW
        ),
        "refused, after running": lambda: refused_status(
            old(RUNNING), ["spec.lora: is only allowed with method: lora or dora"], 3, NOW
        ),
        "new run, resuming": lambda: start_new_run(
            spec(training={"maxSteps": 80}, output={"uri": "s3://out/demo", "resumeFrom": "previous"}),
            3,
            old(finished),
            NOW,
        )[0],
        "new run after a failure, from the start": lambda: start_new_run(
            spec(training={"maxSteps": 80}), 3, old(finished | {"phase": "Failed", "message": "boom"}), NOW
        )[0],
    }


def record() -> dict[str, Any]:
    return {name: wire(make()) for name, make in scenarios().items()}


@pytest.mark.parametrize("name", list(json.loads(GOLDEN.read_text())))
def test_the_status_on_the_wire_is_unchanged(name: str) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    got = json.loads(json.dumps(wire(scenarios()[name]())))
    assert got == expected
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)  # 1 and 1.0 too


def test_every_scenario_is_recorded() -> None:
    if os.environ.get("KUBETUNE_RECORD_WIRE"):
        GOLDEN.write_text(json.dumps(record(), indent=1) + "\n")
    assert sorted(json.loads(GOLDEN.read_text())) == sorted(scenarios())


def test_a_status_key_the_model_does_not_know_is_kept() -> None:
    patch = wire(
        _derive(RUNNING | {"addedLater": {"a": 1}}, Observed(job=job(), pods=[pod()], progress=PROGRESS))
    )
    assert patch["addedLater"] == {"a": 1} and "kopf" not in patch
