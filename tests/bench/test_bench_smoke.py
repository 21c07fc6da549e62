"""Smoke tests for bench/: each script runs in a smoke size (slow tier), so a change that breaks one fails CI: the
throughput benchmark on a tiny model, the S3 benchmark on a few MB, the operator-scale benchmark with 5 jobs, the
GPU runs and the pre-flight memory estimate rehearsed on the CPU (bench/gpu_check.sh: tests/bench/test_gpu_check.py)."""

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
KEYS = (
    "tokens_per_s",
    "baseline_tokens_per_s",
    "peak_mem_gib",
    "baseline_peak_mem_gib",
    "mfu",
    "final_loss",
    "baseline_final_loss",
)


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
    cmd = [
        sys.executable,
        str(REPO / "bench" / "s3_transfer.py"),
        "--mb",
        "4",
        "--files",
        "2",
        "--reps",
        "1",
        "--server",
        server,
        "--out",
        str(out),
    ]
    env = {**os.environ, "KUBETUNE_E2E_BUILD": "0"}  # never build MinIO here; auto falls back to moto
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in (
        "upload_mb_s",
        "baseline_upload_mb_s",
        "download_mb_s",
        "baseline_download_mb_s",
        "upload_ratio",
        "download_ratio",
    ):
        assert _finite(result[key]) and result[key] > 0, key


def test_loss_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "loss.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "loss_memory.py"),
        "--tokens",
        "96",
        "--hidden",
        "32",
        "--vocab",
        "3000",
        "--reps",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["loss_rel_diff"] < 1e-5 and result["grad_w_rel_diff"] < 1e-4
    for side in ("model", "chunked"):
        assert _finite(result[side]["peak_mib"]) and result[side]["seconds"] > 0


# ------------------------------------------------------------------ operator_scale.py


def _bench_module(name: str) -> object:
    import importlib

    for extra in (REPO / "bench", REPO / "e2e"):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    return importlib.import_module(name)


def test_operator_scale_posts_valid_finetunejobs() -> None:
    """Its documents come from the e2e suite's job_doc: a change there (a new key it needs) breaks the bench
    in seconds here, not at the next measurement (`KeyError: 'endpoint'` went unseen)."""
    from kubetune.api.validation import validate_manifest

    bench = _bench_module("operator_scale")
    docs = bench.finetunejob_docs(bench.suite_module(), 3, "smoke")  # type: ignore[attr-defined]
    for doc in docs:
        job, problems = validate_manifest(doc)
        assert job is not None and not problems, problems
        assert job.spec.run_policy.suspend


@pytest.mark.e2e_build
@pytest.mark.slow  # a control plane and the operator: ~1-2 min on two shared cores
def test_operator_scale_smoke(tmp_path: Path) -> None:
    binaries = _bench_module("harness.binaries")
    try:
        binaries.ensure("etcd", "kube-apiserver", "kube-controller-manager")  # type: ignore[attr-defined]
    except binaries.BinariesUnavailable as exc:  # type: ignore[attr-defined]
        pytest.skip(str(exc))
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "bench" / "operator_scale.py"), "--jobs", "5", "--steady", "2", "--window", "5",
           "--poll-interval", "1", "--timeout", "180", "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["kubetune"]["created"] == 5 and result["bare"]["create_seconds"] > 0, result
    for key in ("create_ratio", "delete_ratio", "create_ratio_without_operator"):
        assert _finite(result[key]) and result[key] > 0, key
    steady = result["steady"]
    assert steady["running_at_start_of_window"] == 2 and steady["stub_progress_reads"] > 0, steady
    assert _finite(steady["operator_rss_mib_max"]) and steady["operator_rss_mib_max"] > 0, steady
    assert result["operator_log_errors"] == 0, (tmp_path / "work" / "operator.log").read_text()[-4000:]


@pytest.mark.e2e_build
@pytest.mark.slow  # a control plane, Kueue and the operator: ~2-3 min on two shared cores
def test_kueue_scale_smoke(tmp_path: Path) -> None:
    binaries = _bench_module("harness.binaries")
    try:
        binaries.ensure("etcd", "kube-apiserver", "kube-controller-manager", "kueue")  # type: ignore[attr-defined]
    except binaries.BinariesUnavailable as exc:  # type: ignore[attr-defined]
        pytest.skip(str(exc))
    out = tmp_path / "kueue.json"
    cmd = [sys.executable, str(REPO / "bench" / "kueue_scale.py"), "--jobs", "4", "--quota", "2", "--run-seconds", "1",
           "--steady", "8", "--running", "2", "--window", "5", "--poll-interval", "2", "--timeout", "300",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    kt = result["kubetune"]
    assert kt["outcomes"] == {"Succeeded": 4}, kt
    assert _finite(result["all_started_ratio"]) and _finite(result["all_finished_ratio"]), result
    # a queued job goes Pending -> Initializing -> (Running) -> Succeeded: no Suspended flicker while Kueue starts it
    assert not any("Suspended" in path for path in kt["phase_paths"]), kt["phase_paths"]
    assert kt["apiserver_writes_per_job"].get("POST podgroups") == 1.0, kt["apiserver_writes_per_job"]
    steady = result["steady"]
    assert steady["phases"].get("Running") == 2 and steady["phases"].get("Pending") == 2, steady
    assert steady["operator_requests_at_rest"] == 0, steady  # nothing changes: the operator asks nothing
    assert result["operator_log_errors"] == 0 and not result["kueue_errors"], result


# ------------------------------------------------------------------ the GPU scripts, rehearsed on the CPU


@pytest.mark.slow  # two real trainer runs (torchrun, the tiny model, 2 steps each)
def test_gpu_runs_cpu_rehearsal_smoke(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_runs.py"), "--cpu-rehearsal", "--steps", "2", "--runs", "ddp-lora,ddp-full",
           "--timeout", "500", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    assert sorted(r["run"] for r in runs) == ["ddp-full", "ddp-lora"] and all(r["ok"] for r in runs), runs


@pytest.mark.slow  # two processes, each a 2-layer model trained three steps
def test_preflight_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "preflight.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "preflight_memory.py"),
        "--smoke",
        "--only",
        "lora",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(_finite(r["ratio"]) and r["ratio"] > 0 for r in rows), rows


def test_gpu_wheels_pins_what_ci_pins() -> None:
    """bench/gpu_wheels.sh downloads (network, tens of MB), so CI does not run it; what can rot is checked here:
    it parses, and the versions it carries to the GPU machine are the ones CI tests."""
    import re

    script = REPO / "bench" / "gpu_wheels.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / ".ci" / "constraints.txt").read_text(), re.M)
    )
    carried = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", script.read_text()))
    shared = {name for name in carried if name in pins}
    assert {"transformers", "peft", "deepspeed", "pydantic", "liger-kernel"} <= shared, carried
    assert {n: carried[n] for n in shared} == {n: pins[n] for n in shared}
