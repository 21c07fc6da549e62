"""spec.evaluation and output.interpolate: the rules (each naming the field and the fix, in
`kubetune validate` and as CEL in the CRD), the gate, the WiSE-FT mix, and the status the operator
derives from rank 0's verdict (Failed, EvaluationGateFailed, no restart, the figures shown)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kubetune.api import contract
from kubetune.api.crd import crd
from kubetune.api.models import EvaluationGate, EvaluationResult, FineTuneJobStatus
from kubetune.api.validation import validate_manifest
from kubetune.status.derive import Observed, derive
from kubetune_trainer import gate
from operator_samples import manifest, spec

EVAL = {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"}
RETAIN = {"train": "s3://data/retain.jsonl"}


def problems(**overrides):  # type: ignore[no-untyped-def]
    return [str(p) for p in validate_manifest(manifest(**overrides))[1]]


def test_a_full_evaluation_block_is_valid() -> None:
    assert problems(
        dataset=EVAL,
        training={"evalGenerationSamples": 8},
        evaluation={"retain": RETAIN, "generations": [{"prompt": "one two", "expect": r"^1 2", "match": "regex"}],
                    "gate": {"maxEvalLoss": 1.0, "maxPerplexity": 3.0, "minExactMatch": 0.5, "minGenerationPass": 1.0,
                             "maxForgettingPercent": 10}},
        output={"uri": "s3://out/demo", "interpolate": [0.25, 0.5, 0.75], "select": "best", "selectMetric": "forgetting"},
    ) == []  # fmt: skip


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"evaluation": {"gate": {"maxEvalLoss": 1.0}}}, "spec.evaluation.gate.maxEvalLoss: needs evaluation data: set spec.dataset.eval"),
        ({"dataset": EVAL, "objective": "dpo", "evaluation": {"gate": {"maxPerplexity": 2.0}}}, "spec.evaluation.gate.maxPerplexity: needs evaluation data"),
        ({"evaluation": {"gate": {"minExactMatch": 0.9}}}, "spec.evaluation.gate.minExactMatch: needs spec.training.evalGenerationSamples > 0"),
        ({"evaluation": {"gate": {"minGenerationPass": 1.0}}}, "spec.evaluation.gate.minGenerationPass: needs checks to count: add spec.evaluation.generations"),
        ({"evaluation": {"gate": {"maxForgettingPercent": 5}}}, "spec.evaluation.gate.maxForgettingPercent: needs a retain set"),
        ({"method": "prompt_tuning", "output": {"uri": "s3://out/demo", "interpolate": [0.5]}}, "spec.output.interpolate: mixes full weights"),
        ({"output": {"uri": "s3://out/demo", "interpolate": [0.5], "mergeAdapter": False}}, "spec.output.interpolate: mixes full weights"),
        ({"dataset": EVAL, "output": {"uri": "s3://out/demo", "select": "best"}}, "spec.output.select: best picks among weight mixes"),
        ({"dataset": EVAL, "output": {"uri": "s3://out/demo", "interpolate": [0.5], "select": "best", "selectMetric": "retainLoss"}},
         "spec.output.selectMetric: retainLoss and forgetting need spec.evaluation.retain"),
        ({"output": {"uri": "s3://out/demo", "interpolate": [0.5], "select": "best"}}, "spec.output.selectMetric: evalLoss and perplexity need evaluation data"),
        ({"output": {"uri": "s3://out/demo", "interpolate": [0.5, 0.5]}}, "spec.output.interpolate: list each alpha once"),
        ({"output": {"uri": "s3://out/demo", "interpolate": [1.5]}}, "spec.output.interpolate[0]: must be <= 1"),
        ({"evaluation": {"generations": [{"prompt": "x", "expect": "(", "match": "regex"}]}},
         "spec.evaluation.generations[0]: expect is not a valid regular expression"),
        ({"evaluation": {"retain": {**RETAIN, "evalSplit": 0.1}}}, "spec.evaluation.retain: eval and evalSplit do not apply"),
        ({"evaluation": {"retain": {}}}, "spec.evaluation.retain: set exactly one of train"),
    ],
)  # fmt: skip
def test_each_misuse_is_one_line_naming_the_field_and_the_fix(overrides: dict, expected: str) -> None:
    [problem] = problems(**overrides)
    assert problem.startswith(expected) and "\n" not in problem, problem


def test_the_crd_carries_each_evaluation_rule_as_cel() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    messages = [v["message"] for v in schema["x-kubernetes-validations"]]
    for field in (
        "maxEvalLoss",
        "maxPerplexity",
        "minExactMatch",
        "minGenerationPass",
        "maxForgettingPercent",
    ):
        assert any(m.startswith(f"spec.evaluation.gate.{field}: ") for m in messages), field
    assert any(m.startswith("spec.output.interpolate: ") for m in messages)
    retain = schema["properties"]["evaluation"]["properties"]["retain"]
    assert [v["message"] for v in retain["x-kubernetes-validations"]][1].startswith(
        "spec.evaluation.retain: eval and evalSplit"
    )


def test_gate_failure_is_a_user_error_the_operator_never_retries() -> None:
    code = contract.ExitCode.EVALUATION_GATE_FAILED
    assert not contract.is_retryable(code) and contract.REASONS[code] == "EvaluationGateFailed"


# ---------------------------------------------------------------- gate


@given(value=st.floats(0.0, 100.0), limit=st.floats(0.01, 100.0))
def test_an_upper_threshold_passes_exactly_when_the_figure_is_at_most_it(value: float, limit: float) -> None:
    passed, missed = gate.check(EvaluationGate(max_eval_loss=limit), {"evalLoss": value})
    assert passed is (value <= limit) and (len(missed) == 0) is passed


@given(value=st.floats(0.0, 1.0), limit=st.floats(0.0, 1.0))
def test_a_lower_threshold_passes_exactly_when_the_figure_is_at_least_it(value: float, limit: float) -> None:
    passed, _ = gate.check(EvaluationGate(min_generation_pass=limit), {"generationPass": value})
    assert passed is (value >= limit)


def test_a_figure_not_measured_fails_its_threshold_and_no_gate_is_no_verdict() -> None:
    assert gate.check(EvaluationGate(max_forgetting_percent=5), {}) == (
        False,
        ["forgetting not measured (gate maxForgettingPercent 5)"],
    )
    assert gate.check(None, {"evalLoss": 9.0}) == (None, [])
    assert (
        gate.passed(None)
        and gate.passed(EvaluationResult(gate_passed=None))
        and not gate.passed(EvaluationResult(gate_passed=False))
    )


def test_forgetting_is_the_retain_loss_increase_in_percent() -> None:
    assert gate.forgetting(2.0, 2.5) == pytest.approx(25.0)
    assert gate.forgetting(2.0, 1.0) == pytest.approx(-50.0)
    assert gate.forgetting(None, 1.0) is None


@given(alpha=st.floats(0.0, 1.0), a=st.floats(-10, 10), b=st.floats(-10, 10))
def test_a_mix_is_the_straight_line_from_base_to_fine_tuned(alpha: float, a: float, b: float) -> None:
    base, tuned = (
        {"w": torch.tensor([a], dtype=torch.float64), "n": torch.tensor([1])},
        {"w": torch.tensor([b], dtype=torch.float64), "n": torch.tensor([7])},
    )
    mixed = gate.mix(base, tuned, alpha)
    assert math.isclose(float(mixed["w"]), alpha * b + (1 - alpha) * a, abs_tol=1e-9)
    assert int(mixed["n"]) == 7  # integer buffers are the fine-tuned model's


def test_best_is_lowest_for_losses_highest_for_shares_and_ties_go_to_the_larger_alpha() -> None:
    rows = [{"alpha": 0.5, "evalLoss": 1.0, "exactMatch": 0.9}, {"alpha": 1.0, "evalLoss": 1.0, "exactMatch": 0.5},
            {"alpha": 0.25, "evalLoss": 2.0, "exactMatch": 0.9}]  # fmt: skip
    assert gate.best(rows, "evalLoss")["alpha"] == 1.0
    assert gate.best(rows, "exactMatch")["alpha"] == 0.5


# ---------------------------------------------------------------- status

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def rank0(exit_code: int, message: dict) -> dict:
    term = {
        "exitCode": 1 if exit_code else 0,
        "message": json.dumps(message),
        "finishedAt": "2025-01-01T11:00:00Z",
    }
    return {"metadata": {"name": "demo-r0-0", "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Failed" if exit_code else "Succeeded",
                                                   "containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]}}  # fmt: skip


def test_a_failed_gate_ends_failed_at_once_with_the_figures_in_status() -> None:
    verdict = EvaluationResult(
        eval_loss=3.41, perplexity=30.3, gate_passed=False, failed_checks=["evalLoss 3.41 > maxEvalLoss 0.5"]
    )
    message = contract.TerminationMessage.build(
        69, "evaluation gate failed: evalLoss 3.41 > maxEvalLoss 0.5", evaluation=verdict
    )
    job = {
        "metadata": {"name": "demo-r0"},
        "spec": {},
        "status": {"conditions": [{"type": "Failed", "status": "True"}]},
    }
    d = derive(
        spec(),
        "demo",
        1,
        FineTuneJobStatus(phase="Running"),
        Observed(job=job, pods=[rank0(69, json.loads(message.to_text()))]),
        NOW,
    )
    status = d.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert (status["phase"], d.action, status["restarts"]) == ("Failed", "stop", 0)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    evaluated = next(c for c in status["conditions"] if c["type"] == "Evaluated")
    assert (
        failed["reason"] == "EvaluationGateFailed" and "evalLoss 3.41 > maxEvalLoss 0.5" in failed["message"]
    )
    assert (evaluated["status"], evaluated["reason"]) == ("False", "EvaluationGateFailed")
    assert "evalLoss 3.41" in evaluated["message"] and "perplexity 30.3" in evaluated["message"]
    assert status["evaluation"]["gatePassed"] is False and status["evaluation"]["evalLoss"] == 3.41
    assert (
        status["lastFailure"]["exitCode"] == 69 and status["lastFailure"]["reason"] == "EvaluationGateFailed"
    )


def test_a_passed_gate_shows_an_evaluated_condition_on_success() -> None:
    verdict = EvaluationResult(eval_loss=0.01, forgetting_percent=2.5, gate_passed=True)
    message = contract.TerminationMessage.build(0, "training finished", evaluation=verdict)
    job = {
        "metadata": {"name": "demo-r0"},
        "spec": {},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    d = derive(
        spec(),
        "demo",
        1,
        FineTuneJobStatus(phase="Running"),
        Observed(job=job, pods=[rank0(0, json.loads(message.to_text()))]),
        NOW,
    )
    status = d.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    evaluated = next(c for c in status["conditions"] if c["type"] == "Evaluated")
    assert status["phase"] == "Succeeded" and (evaluated["status"], evaluated["reason"]) == (
        "True",
        "EvaluationPassed",
    )
    assert "forgetting 2.5%" in evaluated["message"] and status["evaluation"]["forgettingPercent"] == 2.5
