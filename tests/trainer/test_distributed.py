"""Two ranks over gloo train together: DDP and DeepSpeed ZeRO-2/3, LoRA and full."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import job_spec, rank_dumps, run_trainer, termination

CASES = {
    "ddp-lora": {"distributed.backend": "ddp", "method": "lora"},
    # perDevice 8 x 2 ranks x 2 accumulation steps
    "ddp-full": {
        "distributed.backend": "ddp",
        "method": "full",
        "lora": None,
        "training.globalBatchSize": 32,
    },
    "zero2-lora": {"distributed.backend": "deepspeed", "distributed.zeroStage": 2, "method": "lora"},
    "zero2-full": {
        "distributed.backend": "deepspeed",
        "distributed.zeroStage": 2,
        "method": "full",
        "lora": None,
    },
    "zero3-lora-offload": {
        "distributed.backend": "deepspeed",
        "distributed.zeroStage": 3,
        "method": "lora",
        "distributed.offloadOptimizer": True,
        "distributed.offloadParams": True,
    },
    "zero3-full": {
        "distributed.backend": "deepspeed",
        "distributed.zeroStage": 3,
        "method": "full",
        "lora": None,
    },
}


def _spec(tmp: Path, overrides: dict) -> dict:
    spec = job_spec(tmp, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("lora", 0) is None:
        spec.pop("lora", None)
    if spec["method"] == "full":
        spec["training"]["learningRate"] = 0.002
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_train_together_and_loss_falls(tmp_path: Path, case: str) -> None:
    code, out = run_trainer(tmp_path, _spec(tmp_path, CASES[case]))
    assert code == 0, out[-4000:]
    ranks = rank_dumps(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["worldSize"] == 2 for r in ranks), ranks  # from torch.distributed, not Accelerate's view
    assert all(r["acceleratorProcesses"] == 2 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"], (
        "ranks ended with different weights: they did not train together"
    )
    if case.startswith("zero"):
        assert all("DEEPSPEED" in r["distributedType"] for r in ranks)
    curve = [point["loss"] for point in ranks[0]["lossCurve"]]
    assert curve[-1] < 0.7 * curve[0], curve
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["worldSize"] == 2
    network = metrics["network"]  # the check before step 0, over the training backend
    assert network["backend"] == "gloo" and network["worldSize"] == 2
    assert [(p["source"], p["target"]) for p in network["pairs"]] == [(1, 0), (0, 1)]
    assert (
        all(p["latencyMs"] > 0 and p["bandwidthGbps"] > 0 for p in network["pairs"])
        and network["allReduceMs"] > 0
    )
    assert termination(tmp_path)["progress"]["network"] == network  # what the operator reads (status.network)
    assert metrics["evalLossAfter"] < metrics["evalLossBefore"]
    assert (tmp_path / "out" / "COMPLETE").exists()
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
