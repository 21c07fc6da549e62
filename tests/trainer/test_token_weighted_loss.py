"""Exact token-weighted loss over accumulation and ranks: two real torchrun ranks, two micro-batches each of ragged
sizes, give the gradients and loss of every example run alone with all tokens weighted the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import free_port, job_spec, write_config

WORKER = Path(__file__).with_name("accumulation_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_two_ranks_with_accumulation_match_each_example_alone(tmp_path: Path, layout: str) -> None:
    spec = job_spec(
        tmp_path, method="full", **{"training.globalBatchSize": 32}
    )  # 8 per device x 2 ranks x 2 micro-batches
    spec.pop("lora")
    config = write_config(tmp_path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(config), str(tmp_path), layout]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # torch.distributed's world, so the ranks trained together
    first = ranks[0]
    assert first["examples"] >= 8 and first["tokens"] > 50
    # Micro-batches of different token counts: a mean per micro-batch, then over micro-batches and ranks, would differ.
    assert len({c for r in ranks for c in r["counts"]}) > 1
    for rank in ranks:
        assert rank["reported_loss"] == pytest.approx(rank["reference_loss"], rel=1e-5)
        for name, grad in rank["reference"].items():
            torch.testing.assert_close(rank["trained"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
