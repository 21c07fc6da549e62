"""Resume, for real (one rank under torchrun): a damaged newest checkpoint is set aside and the older one used,
the "before" figures survive, a changed config is refused by name, and the output records its owner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune.api.contract import ExitCode
from trainer_helpers import job_spec, run_trainer, termination

OVERRIDES = {
    "training.maxSteps": 12,
    "output.checkpointSteps": 4,
    "output.keepCheckpoints": 3,
    "training.evalSteps": 6,
}


@pytest.mark.slow
def test_a_stopped_run_resumes_past_a_damaged_checkpoint_and_keeps_its_before_figures(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, **OVERRIDES)
    code, out = run_trainer(tmp_path, spec, nproc=1, env={"KUBETUNE_DEBUG_STOP_AT_STEP": "10"})
    assert code == ExitCode.PREEMPTED, out[-3000:]
    checkpoints = tmp_path / "out" / "checkpoints"
    newest = checkpoints / "step-00000010"
    weights = newest / "accelerate" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the adapter's tensors; COMPLETE and manifest.json untouched
    weights.write_bytes(bytes(data))

    changed = job_spec(tmp_path, **{**OVERRIDES, "training.learningRate": 0.001})
    code, out = run_trainer(tmp_path, changed, nproc=1)
    assert code == ExitCode.CONFIG_INVALID, out[-3000:]
    message = termination(tmp_path)["message"]
    assert "spec.training.learningRate: 0.005 -> 0.001" in message and "new output" in message, message
    assert "checkpoints/step-00000010 failed verification" in out  # checked before its config was read

    code, out = run_trainer(tmp_path, job_spec(tmp_path, **OVERRIDES), nproc=1)
    assert code == 0, out[-3000:]
    assert "resumed from checkpoint step 8" in out, out[-3000:]
    aside = [p.name for p in checkpoints.iterdir() if ".set-aside-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("step-00000010.set-aside-")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["evalLossBefore"] is not None and metrics["evalLossBefore"] > metrics["evalLossAfter"]
    assert metrics["setAside"][0]["problem"].startswith(
        "accelerate/model.safetensors: content differs from manifest.json (sha256)"
    )
    assert metrics["resumedFrom"]["step"] == 8 and metrics["learningRate"] == 0.005
    assert metrics["owner"]["uid"] == f"uid-{tmp_path.name}"
    final = termination(tmp_path)
    assert final["exitCode"] == 0 and "set aside" in final["message"]
    assert "set aside" in final["progress"]["checkpointWarning"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| eval loss | {metrics['evalLossBefore']:.4g} |" in card


@pytest.mark.slow
def test_another_jobs_output_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".kubetune-owner.json").write_text(
        json.dumps({"job": "other", "namespace": "team-a", "uid": "1234", "run": 1})
    )
    code, log = run_trainer(tmp_path, job_spec(tmp_path, **OVERRIDES), nproc=1)
    assert code == ExitCode.CONFIG_INVALID, log[-3000:]
    message = termination(tmp_path)["message"]
    assert (
        "belongs to job team-a/other (uid 1234, run 1)" in message
        and "choose another spec.output.uri" in message
    )
    assert not (out / "checkpoints").exists() and not (out / "COMPLETE").exists()
