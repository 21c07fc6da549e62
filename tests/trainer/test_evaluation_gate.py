"""spec.evaluation and WiSE-FT through the real entry point (torchrun -> kubetune_trainer), tiny model on CPU:
a gate that passes, a gate that fails (exit code, termination message, artifacts still written, a rerun
fails again), and the
interpolation table (alpha 1 is the fine-tuned model, alpha 0 the base)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.contract import ExitCode
from safetensors.torch import load_file
from trainer_helpers import SPELL, TINY_MODEL, job_spec, rank_dumps, run_trainer, termination

pytestmark = pytest.mark.slow
WORDS = "zero one two three four five six seven eight nine".split()


def small_eval(tmp: Path, n: int = 48) -> str:
    path = tmp / "eval.jsonl"
    path.write_text("\n".join(SPELL.joinpath("eval.jsonl").read_text().splitlines()[:n]) + "\n")
    return str(path)


def retain_set(tmp: Path) -> str:
    """Plain text from the base model's vocabulary: what it should not forget."""
    path = tmp / "retain.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": " ".join(WORDS[(i + k) % 10] for k in range(6))}) + "\n" for i in range(16)
        )
    )
    return str(path)


def evaluated_spec(tmp: Path, steps: int, gate: dict[str, Any], **more: Any) -> dict[str, Any]:
    return job_spec(tmp, **{
        "dataset.eval": small_eval(tmp), "training.maxSteps": steps, "training.evalGenerationSamples": 4,
        "evaluation": {"retain": {"train": retain_set(tmp), "maxSeqLength": 32},
                       "generations": [{"prompt": "one one", "expect": r"^\d", "match": "regex"}], "gate": gate},
        **more,
    })  # fmt: skip


def test_a_failed_gate_exits_not_retryable_with_the_figures_and_keeps_the_artifacts(tmp_path: Path) -> None:
    spec = evaluated_spec(tmp_path, 4, {"maxEvalLoss": 0.01, "maxForgettingPercent": 1000})
    code, out = run_trainer(tmp_path, spec, nproc=2)
    message = termination(tmp_path)
    assert code != 0 and message["exitCode"] == ExitCode.EVALUATION_GATE_FAILED, out[-3000:]
    assert message["reason"] == "EvaluationGateFailed" and "maxEvalLoss 0.01" in message["message"]
    verdict = message["evaluation"]
    assert (
        verdict["gatePassed"] is False
        and verdict["failedChecks"][0].startswith("evalLoss ")
        and verdict["evalLoss"] > 0.01
    )
    assert (
        verdict["retainLossBefore"] > 0 and "forgettingPercent" in verdict
    )  # the passed threshold is reported too
    # Both ranks trained together; the artifacts are complete in the output, for inspection.
    ranks = rank_dumps(tmp_path)
    assert [r["worldSize"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    output = tmp_path / "out"
    assert (output / "COMPLETE").exists() and (output / "model" / "model.safetensors").exists()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["evaluation"]["gatePassed"] is False and metrics["evaluation"][
        "evalLoss"
    ] == pytest.approx(metrics["evalLossAfter"])
    assert [g["prompt"] for g in metrics["evaluation"]["generations"]] == ["one one"]
    # Finished and failed: running it again fails again at once (a failed model never turns into a success).
    code, out = run_trainer(tmp_path, spec, nproc=1)
    again = termination(tmp_path)
    assert (
        code != 0
        and again["exitCode"] == ExitCode.EVALUATION_GATE_FAILED
        and "failed its evaluation gate" in again["message"]
    ), out[-2000:]


def test_interpolation_table_runs_from_base_to_fine_tuned_and_best_is_saved(tmp_path: Path) -> None:
    spec = evaluated_spec(tmp_path, 12, {"maxEvalLoss": 100, "maxForgettingPercent": 1000},
                          **{"output.interpolate": [0.0, 0.5], "output.select": "best", "output.selectMetric": "retainLoss"})  # fmt: skip
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == 0, out[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = {r["alpha"]: r for r in metrics["interpolation"]}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    # alpha 1 is the fine-tuned model, alpha 0 the base: scored in one process, they match the trainer's
    # own evaluation after and before training, and the base's retain loss.
    assert rows[1.0]["evalLoss"] == pytest.approx(metrics["evalLossAfter"], rel=1e-4)
    assert rows[0.0]["evalLoss"] == pytest.approx(metrics["evalLossBefore"], rel=1e-4)
    assert rows[0.0]["retainLoss"] == pytest.approx(metrics["evaluation"]["retainLossBefore"], rel=1e-4)
    assert rows[0.0]["forgetting"] == pytest.approx(0.0, abs=1e-3)
    assert (
        rows[1.0]["evalLoss"] < rows[0.5]["evalLoss"] < rows[0.0]["evalLoss"]
    )  # training lowered the loss; the mix is between
    assert rows[1.0]["perplexity"] == pytest.approx(2.718281828 ** rows[1.0]["evalLoss"], rel=1e-6)
    # select best by retainLoss: the chosen mix's figures are the final ones, its weights are model/.
    chosen = min(rows.values(), key=lambda r: (r["retainLoss"], -r["alpha"]))
    verdict = metrics["evaluation"]
    assert verdict["alpha"] == chosen["alpha"] and verdict["retainLossAfter"] == pytest.approx(
        chosen["retainLoss"]
    )
    assert verdict["gatePassed"] is True and termination(tmp_path)["evaluation"]["gatePassed"] is True
    model = load_file(tmp_path / "out" / "model" / "model.safetensors")
    reference = (load_file(TINY_MODEL / "model.safetensors") if chosen["alpha"] == 0.0 else
                 load_file(tmp_path / "out" / "interpolation" / f"alpha-{chosen['alpha']:.2f}" / "model.safetensors")
                 if chosen["alpha"] != 1.0 else model)  # fmt: skip
    assert all(model[k].allclose(reference[k].to(model[k].dtype), atol=1e-6) for k in model)
    assert (tmp_path / "out" / "interpolation" / "alpha-0.50" / "model.safetensors").exists()
    # the run's model card carries the same table (one row per mix, alpha 0 included)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Weight interpolation (WiSE-FT)" in card
    table = card.split("## Weight interpolation (WiSE-FT)", 1)[1]
    assert all(f"| {a} |" in table for a in ("0", "0.5", "1")), table[:600]
