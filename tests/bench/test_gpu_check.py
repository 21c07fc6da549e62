"""bench/gpu_check.sh, rehearsed on the CPU with the real wheel bundle: call A passes and leaves the tree as it found
it; call B with one trainer run sabotaged still completes every other stage and its results file says what failed;
the results file is whole after any stage; the bundle is slimmed and fits the carry limit; each call's stage limits
fit its timeout; the pre-flight's attention check catches a kernel that is not causal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
CALL_TIMEOUT_S = 540  # the device tool's timeout for each call (bench/README.md, "Running the GPU check")


def _git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored=no"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real bundle: the checkout's .whl/ when bench/gpu_wheels.sh has built it, else built now (network)."""
    if list((REPO / ".whl").glob("*.whl")):
        return REPO / ".whl"
    dest = Path(
        os.environ.get("KUBETUNE_GPU_WHEELS", Path.home() / ".cache" / "kubetune-gpu-wheels" / ".whl")
    )
    if not list(dest.glob("*.whl")):
        env = {**os.environ, "DEST": str(dest), "PYTHON": sys.executable, "PIP": f"{sys.executable} -m pip"}
        proc = subprocess.run(
            ["bash", str(REPO / "bench" / "gpu_wheels.sh")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest


REHEARSAL_BUDGET_S = {"a": 900, "b": 1500}  # gpu_check.sh's rehearsal budgets for two idle cores


def _check(
    call: str, tmp_path: Path, bundle: Path, *extra: str, **env_extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One call rehearsed; its limits stretched by the load per core (other jobs share the machine), as the script does."""
    slack = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    out = tmp_path / f"out-{call}"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "STATE": str(tmp_path / "state"),
        "WHEELS": str(bundle),
        **env_extra,
    }
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--call", call, "--cpu-rehearsal", "--slack", f"{slack:.2f}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=REHEARSAL_BUDGET_S[call] * slack + 120)  # fmt: skip
    return proc, out


def _results(out: Path) -> dict:  # type: ignore[type-arg]
    files = list((out / "results").glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("call", ["a", "b"])
def test_stage_limits_fit_the_call_timeout(call: str) -> None:
    for rehearsal in ([], ["--cpu-rehearsal"]):
        proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--call", call, "--plan", *rehearsal], cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        planned, budget = map(
            int, re.search(r"stage limits (\d+) s .* of a (\d+) s budget", proc.stdout).groups()
        )  # type: ignore[union-attr]
        assert planned <= budget
        if not rehearsal:
            assert budget <= CALL_TIMEOUT_S - 30, proc.stdout


def test_rehearsal_installs_with_the_bundles_platform_tags() -> None:
    """One list of tags (bench/gpu_env.sh) for building the bundle and for the rehearsal's install of it."""
    env_sh = (REPO / "bench" / "gpu_env.sh").read_text()
    assert "manylinux_2_24_x86_64" in env_sh and "manylinux_2_28_x86_64" in env_sh
    for script in ("gpu_wheels.sh", "gpu_check.sh"):
        text = (REPO / "bench" / script).read_text()
        assert "source bench/gpu_env.sh" in text
        assert "--platform" not in text, f"{script} has its own platform tags"


def test_slim_wheel_keeps_only_the_wanted_native_libraries(tmp_path: Path) -> None:
    import gpu_bundle

    wheel = tmp_path / "pkg-1.0-py3-none-manylinux_2_24_x86_64.whl"
    files = {
        f"pkg/libpkg_{v}.so": os.urandom(4096) for v in ("cuda118", "cuda126", "cuda130", "cpu", "rocm64")
    } | {"pkg/__init__.py": b"x = 1\n"}
    import base64
    import hashlib

    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
        for n, d in files.items()
    )
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record + "pkg-1.0.dist-info/RECORD,,\n")
    assert gpu_bundle.check_record(wheel) == []
    before, after = gpu_bundle.slim(wheel, ["cuda130", "cpu"])
    assert after < before
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.endswith(".so")) == ["pkg/libpkg_cpu.so", "pkg/libpkg_cuda130.so"]
    assert gpu_bundle.check_record(wheel) == []  # RECORD lost exactly the dropped lines
    with pytest.raises(SystemExit, match="cuda999"):
        gpu_bundle.slim(wheel, ["cuda999"])


def test_results_file_is_whole_after_a_stage_is_cut_off(tmp_path: Path) -> None:
    """A stage killed mid-write leaves its part unreadable: the merge keeps everything else and the stage's exit code."""
    import gpu_results

    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    (out / "env.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3"}))
    (out / "preflight.json").write_text(json.dumps([{"check": "attention", "ok": True}]))
    (out / "throughput.json").write_text(
        json.dumps({"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "full": {"speedup": 2.0}})
    )
    (out / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [{"call": "a", "stage": "preflight", "exit": 0, "seconds": 50, "limit": 100},
                                                                               {"call": "a", "stage": "lora", "exit": 124, "seconds": 130, "limit": 130}]))  # fmt: skip
    (out / "runs.json").write_text('[{"run": "ddp-lora", "ok": tr')  # cut off
    path = gpu_results.merge(out, state, "a")
    report = json.loads(path.read_text())
    assert path.name == "nvidia-h100-80gb-hbm3-2026-12-06.json"
    assert report["full"]["speedup"] == 2.0 and "lora" not in report
    assert report["gpu_check"]["preflight"][0]["ok"] and "runs" not in report["gpu_check"]
    assert [s["exit"] for s in report["gpu_check"]["stages"]["a"]] == [0, 124]
    assert gpu_results.summary(out, "a") == 1
    # Call B on the same machine starts from call A's file.
    out_b = tmp_path / "out-b"
    out_b.mkdir()
    (out_b / "throughput.json").write_text(
        json.dumps({"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "ragged_full": {"speedup": 5.1}})
    )
    both = json.loads(gpu_results.merge(out_b, state, "b").read_text())
    assert both["full"]["speedup"] == 2.0 and both["ragged_full"]["speedup"] == 5.1
    assert set(both["gpu_check"]["stages"]) == {"a", "b"}


@pytest.mark.slow  # call A on two shared cores: ~3.5 min (versions, install of the real bundle, pre-flight, full and lora)
def test_cpu_rehearsal_call_a(tmp_path: Path, bundle: Path) -> None:
    status_before = _git_status()
    proc, out = _check("a", tmp_path, bundle)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "bundle install in" in proc.stdout and "ok" in proc.stdout
    report = _results(out)
    stages = {s["stage"]: s for s in report["gpu_check"]["stages"]["a"]}
    assert list(stages) == ["setup", "install", "preflight", "full", "lora"]
    assert all(s["exit"] == 0 for s in stages.values()), stages
    checks = report["gpu_check"]["preflight"]
    assert [c["check"] for c in checks] == ["attention", "model", "loss", "liger", "skip"]
    assert all(c["ok"] for c in checks), checks
    for mode in ("full", "lora"):
        assert report[mode]["speedup"] > 0 and report[mode]["speedup_by_timed_steps"], report[mode]
        assert re.search(rf"{mode}\s+RATIO \d+\.\d+x", proc.stdout)  # printed the moment it exists
    assert (
        tmp_path / "state" / "site" / "bitsandbytes" / "libbitsandbytes_cuda130.so"
    ).exists()  # the real bundle, installed
    assert _git_status() == status_before  # nothing written into the tree (results go to OUT, state to STATE)


@pytest.mark.slow  # call B on two shared cores: ~6-10 min (eight short trainer runs, two ragged modes, torch.compile)
def test_cpu_rehearsal_call_b_survives_a_failing_run(tmp_path: Path, bundle: Path) -> None:
    status_before = _git_status()
    proc, out = _check("b", tmp_path, bundle, GPU_CHECK_SABOTAGE="ddp-dora")
    assert proc.returncode == 2, proc.stdout[-6000:] + proc.stderr[-3000:]  # the runs stage's bit only
    assert "FAILED stages: runs" in proc.stdout
    report = _results(out)
    stages = {s["stage"]: s["exit"] for s in report["gpu_check"]["stages"]["b"]}
    assert stages == {
        "setup": 0,
        "install": 0,
        "runs": 1,
        "ragged_full": 0,
        "ragged_lora": 0,
        "compile": 0,
    }, stages
    runs = {r["run"]: r for r in report["gpu_check"]["runs"]}
    assert len(runs) == 8 and not runs["ddp-dora"]["ok"]
    assert all(r["ok"] for name, r in runs.items() if name != "ddp-dora"), runs
    assert report["ragged_full"]["speedup"] > 0 and report["ragged_lora"]["speedup"] > 0
    assert report["gpu_check"]["compile"][0]["ok"]
    assert _git_status() == status_before


def test_preflight_catches_attention_that_is_not_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_preflight
    import torch.nn.functional as F
    from kubetune_trainer import attention

    def full_attention(q, k, v, cu, scale, window):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out[a:b] = (
                F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
                .squeeze(0)
                .transpose(0, 1)
            )
        return out

    monkeypatch.setattr(attention, "_sdpa_per_segment", full_attention)
    result = gpu_preflight.check_attention(torch.device("cpu"), torch.float32)
    assert not result["ok"]
