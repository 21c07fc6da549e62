"""`kubetune preflight`: the detected mapping, learned tokens, lengths, steps and a memory verdict, before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.models import FineTuneJobSpec
from kubetune.cli.main import main
from kubetune_trainer import preflight
from trainer_helpers import TINY_MODEL

SHAREGPT = {"conversations": [{"from": "human", "value": "one two"}, {"from": "gpt", "value": "1 2"},
                              {"from": "human", "value": "three"}, {"from": "gpt", "value": "3"}]}  # fmt: skip


def manifest(tmp: Path, rows: list[dict], **spec: Any) -> Path:
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pf"},
        "spec": {"model": {"source": str(TINY_MODEL)}, "dataset": {"train": "train.jsonl", "maxSeqLength": 16},
                 "training": {"perDeviceBatchSize": 4}, "distributed": {"procsPerNode": 2}, "output": {"uri": "/tmp/unused"}, **spec},
    }  # fmt: skip
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_json_shows_mapping_learned_tokens_lengths_and_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = {"conversations": SHAREGPT["conversations"] * 3}
    assert main(["preflight", str(manifest(tmp_path, [SHAREGPT] * 15 + [long])), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (source,) = summary["sources"]
    assert source["mapping"] == "chat (messages=conversations, role=from, content=value)"
    learned = "".join(t["text"] for t in summary["examples"][0] if t["learned"])
    assert learned == " 1 2 <|end|> 3 <|end|>"
    assert summary["lengths"]["max"] == 3 * 14 and summary["lengths"]["overMaxSeqLength"] == 1
    assert summary["overflow"]["truncated"] == 1 and summary["overflow"]["overflowShare"] == 1 / 16
    assert summary["stepsPerEpoch"] == 2  # 16 sequences / (4 per device x 2 processes)
    assert summary["memory"]["per"] == "process" and summary["memory"]["totalBytes"] > 0


def test_rich_output_marks_learned_tokens_without_colour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["preflight", str(manifest(tmp_path, [SHAREGPT] * 8))]) == 0
    out = capsys.readouterr().out  # not a terminal: no colour, so the learned runs are marked
    assert "example 1: <|user|> one two <|end|> <|assistant|>[[ 1 2 <|end|>]] <|user|> three" in out
    assert "learned tokens between [[ ]]" in out
    assert "steps per epoch" in out and "estimated peak memory per process" in out


def test_a_terminal_shows_learned_tokens_in_colour_without_markers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a colour terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(["preflight", str(manifest(tmp_path, [SHAREGPT] * 8))]) == 0
    out = capsys.readouterr().out
    assert "[[" not in out and "\x1b[1;32m 1" in out and "learned tokens in green" in out


def test_preflight_prints_no_library_warnings(tmp_path: Path) -> None:
    """A fresh process as a user runs it (the warnings fire once per process): nothing on stderr."""
    import subprocess
    import sys

    path = manifest(tmp_path, [SHAREGPT] * 8)
    kubetune = Path(sys.executable).parent / "kubetune"
    quiet = subprocess.run(
        [str(kubetune), "preflight", str(path)], capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = subprocess.run(
        [str(kubetune), "preflight", str(path), "--verbose"], capture_output=True, text=True, timeout=300
    )
    assert (
        loud.returncode == 0 and "FutureWarning" in loud.stderr
    )  # what --verbose shows, and the default hides


def test_data_refusal_exits_66_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = manifest(
        tmp_path,
        [{"question": "one", "reply": "1"}],
        dataset={"train": "train.jsonl", "format": "prompt_completion"},
    )
    assert main(["preflight", str(path)]) == 66
    err = capsys.readouterr().err
    assert err.startswith(
        "DatasetInvalid: train.jsonl line 1 (record 0): format prompt_completion needs prompt ('prompt')"
    )
    assert "set spec.dataset.fields.prompt to the column that holds it (one of question, reply)" in err


def test_too_little_data_for_one_batch_exits_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preflight", str(manifest(tmp_path, [SHAREGPT] * 7))]) == 66
    assert "7 training sequences, fewer than one optimizer step needs (8" in capsys.readouterr().err


def big_model(tmp: Path, **config: Any) -> Path:
    """A Llama-2-7B-shaped config.json beside the tiny tokenizer: sized on the meta device, never loaded."""
    directory = tmp / "big"
    shutil.copytree(TINY_MODEL, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False, "head_dim": 128, **config})  # fmt: skip
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _spec(model: Path, **kw: Any) -> FineTuneJobSpec:
    base: dict[str, Any] = {"model": {"source": str(model)}, "dataset": {"train": "/x.jsonl", "maxSeqLength": 2048},
                            "output": {"uri": "/tmp/x"}, "training": {"perDeviceBatchSize": 4}}  # fmt: skip
    for key, value in kw.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    return FineTuneJobSpec.model_validate(base)


def test_memory_estimate_warns_when_full_fine_tuning_of_7b_will_not_fit_one_gpu(tmp_path: Path) -> None:
    model = big_model(tmp_path)
    full = _spec(model, method="full", distributed={"gpusPerNode": 1, "backend": "ddp"})
    trainable, total, _ = preflight.parameter_counts(full, model)
    assert trainable == total and 6.7e9 < total < 6.8e9
    estimate = preflight.job_memory(
        full, model, 2048, on_gpu=True, deepspeed=False, gpu_memory=80 * preflight.GIB
    )
    assert estimate.fits is False and "WARNING: more than the 80.00 GiB available per GPU" in estimate.line()
    assert (
        estimate.parts["optimizer"] == 8 * total and estimate.parts["weights"] == 4 * total
    )  # fp32 masters under DDP

    lora = _spec(
        model,
        method="lora",
        distributed={"gpusPerNode": 1, "backend": "ddp"},
        training={"gradientCheckpointing": True},
    )
    small = preflight.job_memory(
        lora, model, 2048, on_gpu=True, deepspeed=False, gpu_memory=80 * preflight.GIB
    )
    assert small.fits is True and small.parts["weights"] < 15 * preflight.GIB


def test_zero3_across_eight_gpus_splits_weights_gradients_and_optimizer(tmp_path: Path) -> None:
    model = big_model(tmp_path)
    one = _spec(
        model,
        method="full",
        distributed={"gpusPerNode": 1, "procsPerNode": 1, "backend": "deepspeed", "zeroStage": 3},
    )
    eight = _spec(
        model,
        method="full",
        distributed={"gpusPerNode": 8, "procsPerNode": 8, "backend": "deepspeed", "zeroStage": 3},
    )
    a = preflight.job_memory(one, model, 2048, True, True, 80 * preflight.GIB)
    b = preflight.job_memory(eight, model, 2048, True, True, 80 * preflight.GIB)
    for part in ("weights", "gradients", "optimizer"):
        assert b.parts[part] == a.parts[part] // 8
    assert b.parts["activations"] == a.parts["activations"]
