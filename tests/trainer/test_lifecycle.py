"""A whole run: artifacts load with stock libraries; SIGTERM then restart resumes; bad input exits with the right code."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from kubetune.api.contract import ExitCode
from trainer_helpers import TINY_MODEL, job_spec, launch, rank_dumps, run_trainer, termination, write_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lora-run")
    code, out = run_trainer(tmp, job_spec(tmp, **{"training.evalGenerationSamples": 20}), nproc=1)
    assert code == 0, out[-4000:]
    return tmp / "out"


@pytest.mark.slow
def test_artifacts_layout_and_manifest(lora_run: Path) -> None:
    from kubetune.api.storage import sha256_file

    for name in ("adapter/adapter_config.json", "model/model.safetensors", "model/tokenizer.json", "model/chat_template.jinja",
                 "metrics.json", "trainer-config.yaml", "manifest.json", "COMPLETE"):  # fmt: skip
        assert (lora_run / name).exists(), name
    manifest = json.loads((lora_run / "manifest.json").read_text())
    files = {
        p.relative_to(lora_run).as_posix()
        for p in lora_run.rglob("*")
        if p.is_file() and not p.as_posix().startswith(str(lora_run / "checkpoints"))
    }
    assert set(manifest["files"]) == files - {
        "manifest.json",
        "COMPLETE",
        ".kubetune-owner.json",
        ".kubetune-run.json",
        ".kubetune.lock",
    }
    for rel, entry in manifest["files"].items():
        assert sha256_file(lora_run / rel) == entry["sha256"]
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["lossCurve"] and metrics["evalLossAfter"] < metrics["evalLossBefore"]
    assert metrics["tokensPerSecond"] > 0 and metrics["wallSeconds"] > 0
    assert "exactMatchBefore" in metrics and "exactMatchAfter" in metrics


@pytest.mark.slow
def test_the_model_card_and_its_plots_come_from_the_runs_metrics(lora_run: Path) -> None:
    from PIL import Image

    card = (lora_run / "README.md").read_text()
    metrics = json.loads((lora_run / "metrics.json").read_text())
    manifest = json.loads((lora_run / "manifest.json").read_text())
    assert {"README.md", "loss.png", "eval.png"} <= set(manifest["files"])  # sealed with the weights
    assert card.startswith("---\n")  # the Hub's YAML front matter, then the Markdown body
    body = card.split("\n---\n", 1)[1].lstrip()
    assert body.startswith("# t\n") and str(TINY_MODEL) in body and "lora (r=8, alpha=16" in body
    row = next(line for line in card.splitlines() if line.startswith("| eval loss |"))
    assert row == f"| eval loss | {metrics['evalLossBefore']:.4g} | {metrics['evalLossAfter']:.4g} |"
    assert f"| exact match | {metrics['exactMatchBefore']:.4g} | {metrics['exactMatchAfter']:.4g} |" in card
    assert "| length | 30 steps (30 done) |" in card and "learning rate | 0.005, cosine" in card
    assert "![loss](loss.png)" in card and "![eval](eval.png)" in card
    for name in ("loss.png", "eval.png"):
        with Image.open(lora_run / name) as img:
            img.verify()  # a whole, valid PNG
            assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 200


@pytest.mark.slow
def test_success_termination_message_carries_the_final_progress(lora_run: Path) -> None:
    """The operator's last poll can be a step behind; the message rank 0 leaves has the last step."""
    message = termination(lora_run.parent)
    assert message["exitCode"] == 0 and message["reason"] == "Succeeded"
    progress = message["progress"]
    assert progress["step"] == progress["totalSteps"] > 0 and progress["phase"] == "Succeeded"
    assert progress["loss"] > 0 and "evalLoss" in progress
    assert len(json.dumps(message)) < 4096  # what Kubernetes keeps of a termination message


@pytest.mark.slow
def test_merged_model_matches_base_plus_adapter(lora_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lora_run / "model"))
    assert tokenizer.chat_template
    ids = torch.tensor(
        [
            tokenizer("<|user|> one two three four <|end|> <|assistant|>", add_special_tokens=False)[
                "input_ids"
            ]
        ]
    )
    merged = AutoModelForCausalLM.from_pretrained(str(lora_run / "model")).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)), str(lora_run / "adapter")
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)


@pytest.mark.slow
def test_sigterm_checkpoints_then_restart_resumes(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, **{"training.maxSteps": 400, "output.checkpointSteps": 1000})
    config = write_config(tmp_path, spec)
    proc = launch(tmp_path, config, nproc=2, start_new_session=True)
    assert proc.stdout is not None
    seen = []
    deadline = time.time() + 180
    for line in proc.stdout:  # wait until training is under way
        seen.append(line)
        if "step 20/400" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)  # to torchrun, as the kubelet does to PID 1
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "".join(seen) + out
    steps = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert steps, "".join(seen) + out
    stopped_at = int(steps[-1].name.split("-")[1])
    assert 20 <= stopped_at < 400 and (steps[-1] / "COMPLETE").exists()
    assert termination(tmp_path)["exitCode"] == ExitCode.PREEMPTED
    assert not (tmp_path / "out" / "COMPLETE").exists()

    shutil.rmtree(tmp_path / "ranks", ignore_errors=True)
    code, out = run_trainer(tmp_path, spec)  # the same config: a changed one is refused (honest resume)
    assert code == 0, out[-4000:]
    assert f"resumed from checkpoint step {stopped_at}" in out
    logged = [int(m) for m in re.findall(r"step (\d+)/\d+ loss", out)]
    assert logged and min(logged) > stopped_at  # no step before the checkpoint was trained again
    curve_steps = [point["step"] for point in rank_dumps(tmp_path)[0]["lossCurve"]]
    assert curve_steps == sorted(set(curve_steps))  # the loss curve carries over, without repeats
    assert (tmp_path / "out" / "COMPLETE").exists() and (
        tmp_path / "out" / "adapter" / "adapter_config.json"
    ).exists()


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path: Path) -> None:
    """Model, optimizer, scheduler, RNG and data position all come back: resuming changes nothing."""
    overrides = {
        "training.maxSteps": 20,
        "output.checkpointSteps": 1000,
        "dataset.eval": None,
        "lora.dropout": 0.1,
    }
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    code, out = run_trainer(straight, job_spec(straight, **overrides))
    assert code == 0, out[-3000:]
    code, out = run_trainer(split, job_spec(split, **overrides), env={"KUBETUNE_DEBUG_STOP_AT_STEP": "11"})
    assert code == ExitCode.PREEMPTED, out[-3000:]
    assert (split / "out" / "checkpoints" / "step-00000011" / "COMPLETE").exists()
    code, out = run_trainer(split, job_spec(split, **overrides))
    assert code == 0 and "resumed from checkpoint step 11" in out, out[-3000:]
    assert rank_dumps(split)[0]["digest"] == rank_dumps(straight)[0]["digest"]


@pytest.mark.slow
def test_early_stopping_ends_before_max_steps(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, **{"training.maxSteps": 200, "training.learningRate": 1e-9, "training.evalSteps": 2,
                                 "dataset.eval": None, "dataset.evalSplit": 0.1,
                                 "training.earlyStopping": {"patience": 2, "minDelta": 0.01}})  # fmt: skip
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == 0, out[-3000:]
    assert "early stopping" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and (tmp_path / "out" / "COMPLETE").exists()


@pytest.mark.slow
def test_full_fine_tune_with_frozen_layers_saves_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = job_spec(tmp_path, method="full", freeze={"firstNLayers": 1}, **{"training.maxSteps": 5})
    spec.pop("lora")
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == 0, out[-4000:]
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)).state_dict()
    assert torch.equal(
        tuned["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(
        tuned["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "fused", ["0", "1"]
)  # 1: fused AdamW skips the bad step on the device, flags read a step late
def test_non_finite_loss_stops_with_loss_not_finite(tmp_path: Path, fused: str) -> None:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(TINY_MODEL, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, out = run_trainer(
        tmp_path,
        job_spec(tmp_path, **{"model.source": str(model)}),
        nproc=1,
        env={"KUBETUNE_FUSED_ADAMW": fused},
    )
    assert code == ExitCode.LOSS_NOT_FINITE, out[-3000:]
    assert "loss became nan" in termination(tmp_path)["message"]
    assert not (tmp_path / "out" / "checkpoints").exists()  # no bad step was ever saved


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "exit_code"),
    [
        ({"model.source": "/nonexistent/model"}, ExitCode.MODEL_NOT_FOUND),
        ({"dataset.train": "/nonexistent/train.jsonl"}, ExitCode.DATASET_INVALID),
    ],
)
def test_missing_inputs_exit_with_user_error_codes(tmp_path: Path, override: dict, exit_code: int) -> None:
    code, out = run_trainer(tmp_path, job_spec(tmp_path, **override), nproc=1)
    assert code == exit_code, out[-3000:]
    message = termination(tmp_path)
    assert message["exitCode"] == exit_code and "does not exist" in message["message"]
