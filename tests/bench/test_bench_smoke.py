"""Smoke tests for bench/: the throughput benchmark end to end on a tiny model, the S3 benchmark on a few MB."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODES = ("full", "lora", "ragged_full", "ragged_lora")
KEYS = ("tokens_per_s", "baseline_tokens_per_s", "peak_mem_gib", "baseline_peak_mem_gib", "mfu", "final_loss", "baseline_final_loss")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow  # ~20-40 s on two shared cores: two trainers x four modes, plus imports
def test_trainer_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "trainer_throughput.py"), "--tiny", "--steps", "4", "--warmup", "1",
           "--seq", "64", "--mb", "2", "--no-isolate", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert isinstance(report["device"], str) and report["device"]
    on_gpu = not report["device"].startswith("cpu")
    for mode in MODES:
        row = report[mode]
        for key in KEYS:
            assert key in row, f"{mode} lacks {key}"
            if key == "mfu" and not on_gpu:
                assert row[key] is None  # MFU has no meaning on CPU
            else:
                assert _finite(row[key]), f"{mode}.{key} = {row[key]!r}"
        assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        assert row["peak_mem_gib"] >= 0 and row["baseline_peak_mem_gib"] >= 0
    # Same initial weights, same data and order, same hyper-parameters, fp32 on CPU: the fixed-length losses agree.
    for mode in ("full", "lora"):
        assert report[mode]["final_loss"] == pytest.approx(report[mode]["baseline_final_loss"], rel=1e-3)


def test_s3_transfer_smoke(tmp_path: Path) -> None:
    out = tmp_path / "s3.json"
    server = "auto" if (Path(sys.executable).parent / "moto_server").exists() else "threaded-moto"
    cmd = [sys.executable, str(REPO / "bench" / "s3_transfer.py"), "--mb", "4", "--files", "2", "--reps", "1", "--server", server, "--out", str(out)]
    env = {**os.environ, "KUBETUNE_E2E_BUILD": "0"}  # never build MinIO here; auto falls back to moto
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("upload_mb_s", "baseline_upload_mb_s", "download_mb_s", "baseline_download_mb_s", "upload_ratio", "download_ratio"):
        assert _finite(result[key]) and result[key] > 0, key


def test_loss_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "loss.json"
    cmd = [sys.executable, str(REPO / "bench" / "loss_memory.py"), "--tokens", "96", "--hidden", "32", "--vocab", "3000", "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["loss_rel_diff"] < 1e-5 and result["grad_w_rel_diff"] < 1e-4
    for side in ("model", "chunked"):
        assert _finite(result[side]["peak_mib"]) and result[side]["seconds"] > 0
