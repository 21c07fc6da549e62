"""Progress endpoint, termination message, storage resolution, checkpoint bookkeeping, model errors."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from kubetune.api.contract import (
    COMPLETE_MARKER,
    ExitCode,
    ProgressReport,
    TerminationMessage,
    TrainerPhase,
    is_retryable,
)
from kubetune.api.models import Progress, StorageSpec
from kubetune.api.storage import sha256_file
from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer import storage
from kubetune_trainer.errors import TrainerError, write_termination_message
from kubetune_trainer.progress import ProgressState, prometheus_text, serve


def test_progress_endpoint_serves_camel_case_json_and_prometheus() -> None:
    state = ProgressState()
    server = serve(state, 0, host="127.0.0.1")
    try:
        state.update(step=5, total_steps=10, loss=1.5, learning_rate=1e-3, tokens_per_second=100.0, eta_seconds=3.0, epoch=0.5,
                     phase=TrainerPhase.TRAINING)  # fmt: skip
        port = server.server_address[1]
        body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress"))
        assert ProgressReport.model_validate(body) == state.report()
        assert body["step"] == 5 and body["totalSteps"] == 10 and body["phase"] == "Training"
        # The operator's model reads the same names (the checkpoint fields go to status.lastCheckpoint).
        Progress.model_validate(
            {k: v for k, v in body.items() if k not in ("phase", "lastCheckpoint", "checkpointRequests")}
        )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert (
            "kubetune_trainer_step 5.0" in metrics and "kubetune_trainer_tokens_per_second 100.0" in metrics
        )
        assert 'kubetune_trainer_phase{phase="Training"} 1.0' in metrics
        assert 'kubetune_trainer_phase{phase="Saving"} 0.0' in metrics
    finally:
        server.shutdown()


def test_prometheus_text_skips_unknown_values() -> None:
    state = ProgressState()
    state.update(step=1)
    text = prometheus_text(state).decode()
    assert "kubetune_trainer_loss" not in text and "# TYPE kubetune_trainer_step gauge" in text
    with pytest.raises(KeyError):
        state.update(totalSteps=3)  # Python names only: a typo cannot slip through


def test_termination_message_goes_to_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "term"))
    write_termination_message(ExitCode.DATASET_INVALID, "bad rows")
    assert json.loads((tmp_path / "term").read_text()) == {
        "exitCode": 66,
        "reason": "DatasetInvalid",
        "message": "bad rows",
    }
    assert TerminationMessage.read(tmp_path / "term") == TerminationMessage(
        exit_code=66, reason="DatasetInvalid", message="bad rows"
    )
    write_termination_message(ExitCode.INFRASTRUCTURE, "peer lost")  # a follow-on error never hides the first
    assert TerminationMessage.read(tmp_path / "term").exit_code == 66  # type: ignore[union-attr]
    assert not is_retryable(66)


def test_pvc_and_file_uris_map_to_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/data")
    assert storage.local_path("pvc://models/llama/7b") == Path("/data/models/llama/7b")
    assert storage.local_path("file:///a/b") == Path("/a/b")
    assert storage.local_path("/a/b") == Path("/a/b")
    assert storage.local_path("s3://b/k") is None


def test_missing_local_model_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(TrainerError) as err:
        storage.fetch(str(tmp_path / "nope"), StorageSpec(), "spec.model.source", ExitCode.MODEL_NOT_FOUND)
    assert err.value.exit_code == ExitCode.MODEL_NOT_FOUND and "does not exist" in err.value.message


def test_corrupt_model_is_model_not_found(tmp_path: Path) -> None:
    import shutil

    import torch
    from kubetune_trainer.model import load_model
    from trainer_helpers import TINY_MODEL

    bad = tmp_path / "model"
    shutil.copytree(TINY_MODEL, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(TrainerError) as err:
        load_model(bad, torch.float32, False)
    assert err.value.exit_code == ExitCode.MODEL_NOT_FOUND
    with pytest.raises(TrainerError) as err:
        load_model(tmp_path, torch.float32, False)
    assert "config.json" in err.value.message


def test_node_cache_fills_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path))
    calls = []
    fill = lambda d: (calls.append(d), (d / "f").write_text("x"))  # noqa: E731
    first, second = storage.cached("k", fill), storage.cached("k", fill)
    assert first == second and len(calls) == 1 and (first / "f").read_text() == "x"


def test_checkpoints_sealed_listed_and_pruned(tmp_path: Path) -> None:
    store = storage.OutputStore(str(tmp_path / "out"), StorageSpec())
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"abc")
    for step in (10, 20, 30):
        files = ckpt.file_table(src)
        ckpt.upload_files(store, src, ckpt.checkpoint_rel(step), files)
        ckpt.seal(store, ckpt.checkpoint_rel(step), files, step=step)
    ckpt.upload_files(store, src, ckpt.checkpoint_rel(40), ckpt.file_table(src))  # crashed before COMPLETE
    assert ckpt.complete_checkpoints(store) == [10, 20, 30]
    ckpt.prune_checkpoints(store, keep=2)
    assert ckpt.complete_checkpoints(store) == [20, 30]
    assert (
        tmp_path / "out/checkpoints/step-00000040"
    ).exists()  # newer than the newest complete: may be in flight
    manifest = json.loads((tmp_path / "out/checkpoints/step-00000030/manifest.json").read_text())
    assert manifest["files"]["sub/w.bin"]["sha256"] == sha256_file(src / "sub" / "w.bin")
    assert (tmp_path / "out/checkpoints/step-00000030" / COMPLETE_MARKER).exists()
