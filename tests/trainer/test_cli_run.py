"""`kubetune run`: the quickstart manifest, trained locally with torchrun, leaves loadable artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO


@pytest.mark.slow
def test_kubetune_run_quickstart_short(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli.main", "run", str(REPO / "examples" / "quickstart.yaml"), "--output", str(out),
         "--set", "training.maxSteps=40", "--set", "training.evalSteps=20", "--set", "training.evalGenerationSamples=10"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 40/40" in proc.stderr and "artifacts in file://" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["worldSize"] == 2 and metrics["steps"] == 40
    assert metrics["evalLossAfter"] < metrics["evalLossBefore"]
    assert (out / "COMPLETE").exists() and (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_kubetune_run_reports_the_trainer_exit_code(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        (REPO / "examples" / "quickstart.yaml")
        .read_text()
        .replace("file://data/tiny-llama", "file:///nonexistent/model")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli.main", "run", str(manifest), "--output", str(tmp_path / "o"), "--nproc", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 65, proc.stderr[-3000:]
    assert "ModelNotFound" in proc.stderr and "does not exist" in proc.stderr


def test_kubetune_run_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {method: lora}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli.main", "run", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 64 and "model" in proc.stderr
