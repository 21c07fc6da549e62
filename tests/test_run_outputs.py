"""`kubetune run` and its output, before torch starts: a dry run writes nothing; an output reached through a
symlink is still checked against the inputs; another job's output, or one whose lock a run holds, is refused
in one line; integers beyond the CRD's int64 are refused; a stop that arrives after the output was sealed
reports success."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import pytest
from kubetune.cli import run as run_cli
from kubetune.cli.main import main

GOOD = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: demo
spec:
  model: {source: file://model}
  dataset: {train: file://data/train.jsonl}
  method: lora
  lora: {r: 8, alpha: 16}
  training: {maxSteps: 2, perDeviceBatchSize: 4, seed: 1}
  distributed: {nodes: 1, procsPerNode: 1}
  output: {uri: file://out/demo}
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    return path


def test_a_dry_run_writes_nothing(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(manifest), "--dry-run"]) == 0
    assert not (manifest.parent / "out").exists()
    assert "kubetune_trainer --config" in capsys.readouterr().out


def test_an_output_linked_into_the_base_model_is_refused(
    manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (manifest.parent / "out").mkdir()
    (manifest.parent / "out" / "demo").symlink_to(manifest.parent / "model")
    assert main(["run", str(manifest), "--dry-run"]) == 64
    err = capsys.readouterr().err
    assert "resolves to" in err and "overlaps spec.model.source" in err
    assert not (manifest.parent / "model" / "COMPLETE").exists()


def test_another_jobs_output_is_refused_naming_the_owner(
    manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = manifest.parent / "out" / "demo"
    out.mkdir(parents=True)
    (out / ".kubetune-owner.json").write_text(
        json.dumps({"job": "other", "namespace": "default", "uid": "local-other"})
    )
    assert main(["run", str(manifest), "--dry-run"]) == 64
    err = capsys.readouterr().err
    assert "belongs to job default/other (uid local-other)" in err and "choose another --output" in err
    assert len(err.strip().splitlines()) == 1


def test_the_same_jobs_output_is_its_own_to_resume(manifest: Path) -> None:
    out = manifest.parent / "out" / "demo"
    out.mkdir(parents=True)
    (out / ".kubetune-owner.json").write_text(
        json.dumps({"job": "demo", "namespace": "default", "uid": "local-demo"})
    )
    assert main(["run", str(manifest), "--dry-run"]) == 0


def test_an_output_whose_lock_is_held_is_refused(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from filelock import FileLock

    out = manifest.parent / "out" / "demo"
    out.mkdir(parents=True)
    with FileLock(str(out / ".kubetune.lock")):  # another run's rank 0 holds it while it trains
        assert main(["run", str(manifest), "--dry-run"]) == 64
    assert "in use by another run" in capsys.readouterr().err
    assert main(["run", str(manifest), "--dry-run"]) == 0  # released: free again


@pytest.mark.parametrize("value", ["100000000000000000000000", "9223372036854775808", "-9223372036854775809"])
def test_integers_beyond_int64_are_refused(
    manifest: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    assert (
        main(
            [
                "run",
                str(manifest),
                "--dry-run",
                "--set",
                f"training.seed={value}",
                "--set",
                f"training.maxSteps={value}",
            ]
        )
        == 64
    )
    assert "spec.training.maxSteps: must fit a 64-bit integer" in capsys.readouterr().err


def test_a_stop_after_the_output_was_sealed_reports_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "COMPLETE").write_text("done\n")
    (out / "metrics.json").write_text(json.dumps({"evalLossBefore": 2.0, "evalLossAfter": 1.0}))
    (tmp_path / "termination-log").write_text(
        json.dumps({"exitCode": 0, "reason": "Succeeded", "message": "training finished"})
    )
    log = tmp_path / "train.log"
    log.write_text("")
    args = argparse.Namespace(manifest="job.yaml")
    code = run_cli.report(
        -int(signal.SIGTERM), tmp_path, f"file://{out}", 3.0, log, int(signal.SIGTERM), args
    )
    err = capsys.readouterr().err
    assert code == 0 and "done in" in err and "evalLossAfter: 1.0000" in err and "resume with" not in err


def test_a_stop_before_the_output_was_sealed_still_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "termination-log").write_text(
        json.dumps({"exitCode": 143, "reason": "Preempted", "message": "stopped"})
    )
    log = tmp_path / "train.log"
    log.write_text("")
    code = run_cli.report(
        143,
        tmp_path,
        f"file://{tmp_path / 'out'}",
        3.0,
        log,
        int(signal.SIGTERM),
        argparse.Namespace(manifest="job.yaml"),
    )
    assert code == 128 + signal.SIGTERM and "resume with" in capsys.readouterr().err
