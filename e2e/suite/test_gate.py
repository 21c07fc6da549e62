"""Issue 15, item 1: a FineTuneJob whose final model misses its evaluation gate ends Failed with
reason EvaluationGateFailed, the figures in status (status.evaluation, the Evaluated condition,
lastFailure), no gang restart although backoffLimit allows some, and its artifacts in S3 for
inspection (metrics.json with the verdict, the model, COMPLETE)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import job_doc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "faults"


def test_a_job_that_fails_its_gate_ends_failed_with_the_figures_and_is_not_retried(
    kctl, suite_ns, s3, s3_data, node, operator
):
    name = "gate-fail"
    doc = job_doc(name, s3, s3_data, steps=2, checkpoint_steps=2, **{
        "runPolicy.backoffLimit": 2,
        "evaluation": {"retain": {"train": s3_data["eval"], "maxSeqLength": 32},
                       "gate": {"maxEvalLoss": 0.01, "maxForgettingPercent": 1000}},
    })  # fmt: skip
    kctl.apply(suite_ns, doc)
    wait_for("Failed", lambda: kctl.phase(suite_ns, name) == "Failed", 300, 1)
    status = kctl.status(suite_ns, name)
    print(f"\n[suite] {name}: {status.get('evaluation')}", file=sys.stderr)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    evaluated = next(c for c in status["conditions"] if c["type"] == "Evaluated")
    assert failed["reason"] == "EvaluationGateFailed" and "maxEvalLoss 0.01" in failed["message"], failed
    assert (evaluated["status"], evaluated["reason"]) == ("False", "EvaluationGateFailed"), evaluated
    verdict = status["evaluation"]
    assert (
        verdict["gatePassed"] is False and verdict["evalLoss"] > 0.01 and verdict["retainLossBefore"] > 0
    ), verdict
    assert f"evalLoss {verdict['evalLoss']:.4g}" in evaluated["message"]
    assert (
        status["lastFailure"]["reason"] == "EvaluationGateFailed" and status["lastFailure"]["exitCode"] == 69
    )
    # Not transient: no restart, no second gang, although backoffLimit is 2.
    second = kctl.get(suite_ns, "pods", None, f"-l=kubetune.io/job-name={name},kubetune.io/restart=1")
    assert status.get("restarts", 0) == 0 and not second
    # The artifacts stay in S3 for inspection, with the verdict.
    client = s3.client()
    metrics = json.loads(client.get_object(Bucket=s3.bucket, Key=f"runs/{name}/metrics.json")["Body"].read())
    assert (
        metrics["evaluation"]["gatePassed"] is False
        and metrics["evaluation"]["failedChecks"] == verdict["failedChecks"]
    )
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"runs/{name}/")["Contents"]}
    assert {f"runs/{name}/COMPLETE", f"runs/{name}/model/model.safetensors"} <= keys, sorted(keys)
