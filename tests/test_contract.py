"""The operator-trainer contract is written once: kubetune.api.contract holds each shared string,
and both sides import it (a copy elsewhere would drift)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
from kubetune.api import contract
from kubetune.api.contract import ProgressReport, TerminationMessage, TrainerPhase
from kubetune.api.models import Progress, TrainerReport, TrainingMetrics

REPO = Path(__file__).resolve().parents[1]
SHARED = {
    "TERMINATION_LOG": contract.TERMINATION_LOG,
    "PVC_ROOT": contract.PVC_ROOT,
    "ENV_PVC_ROOT": contract.ENV_PVC_ROOT,
    "ENV_TERMINATION_LOG": contract.ENV_TERMINATION_LOG,
    "ENV_CONFIG_PATH": contract.ENV_CONFIG_PATH,
    "ENV_CACHE_DIR": contract.ENV_CACHE_DIR,
    "CONFIG_MOUNT_DIR": contract.CONFIG_MOUNT_DIR,
    "CACHE_MOUNT_DIR": contract.CACHE_MOUNT_DIR,
    "TrainerPhase.TRAINING": TrainerPhase.TRAINING.value,
    "TrainerPhase.EVALUATING": TrainerPhase.EVALUATING.value,
    "TrainerPhase.SAVING": TrainerPhase.SAVING.value,
}


def _string_constants() -> Counter[str]:
    """Every string literal in the operator's and the trainer's code (docstrings aside)."""
    counts: Counter[str] = Counter()
    for package in (REPO / "operator" / "kubetune", REPO / "trainer_image" / "kubetune_trainer"):
        for path in package.rglob("*.py"):
            tree = ast.parse(path.read_text())
            docstrings = {
                id(node.body[0].value)
                for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
            }  # fmt: skip
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in docstrings
                ):
                    counts[node.value] += 1
    return counts


def test_each_shared_string_is_written_once() -> None:
    counts = _string_constants()
    assert {name: counts[value] for name, value in SHARED.items()} == dict.fromkeys(SHARED, 1)


def test_progress_fields_are_listed_once() -> None:
    """The trainer's report and the status share TrainerReport (TrainingMetrics and the data warning);
    neither adds a field of its own besides the phase, the checkpoint fields (status.lastCheckpoint, not
    status.progress) and what the operator computes."""
    reported = set(TrainerReport.model_fields)
    assert set(TrainingMetrics.model_fields) < reported
    assert set(ProgressReport.model_fields) == reported | {"phase", "last_checkpoint", "checkpoint_requests"}
    assert set(Progress.model_fields) == reported | {"percent", "eta", "trainer_phase", "updated_at"}


def test_termination_message_round_trips_and_refuses_other_text() -> None:
    report = ProgressReport(step=3, total_steps=3, loss=0.5, phase=TrainerPhase.SUCCEEDED)
    message = TerminationMessage.build(0, "training finished", report)
    assert TerminationMessage.parse(message.to_text()) == message
    assert message.progress == {"step": 3, "totalSteps": 3, "loss": 0.5, "phase": "Succeeded"}
    clipped = TerminationMessage.build(66, "head " + "x" * 5000 + " tail").message
    assert (
        len(clipped) <= contract.MESSAGE_LIMIT and clipped.startswith("head x") and clipped.endswith("x tail")
    )
    assert TerminationMessage.parse("Traceback (most recent call last): ...") is None
    assert TerminationMessage.parse('{"exitCode": "not a number"}') is None


def _published(root: Path) -> contract.ArtifactManifest:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "metrics.json").write_text("{}")
    (root / contract.COMPLETE_MARKER).write_text("now\n")
    return contract.ArtifactManifest.of(root, job="demo", step=30)


def test_the_manifest_lists_every_file_but_its_markers_and_round_trips(tmp_path: Path) -> None:
    manifest = _published(tmp_path)
    assert sorted(manifest.files) == ["metrics.json", "model/model.safetensors"]
    assert manifest.files["model/model.safetensors"].size == 7
    text = manifest.to_text()
    assert '"createdAt"' in text and '"sha256"' in text  # the wire format readers (and older ones) know
    assert contract.ArtifactManifest.parse(text) == manifest
    assert contract.ArtifactManifest.parse('{"files": {}, "writtenBy": "a newer trainer"}').files == {}


def test_the_manifest_verifies_the_bytes_it_lists(tmp_path: Path) -> None:
    manifest = _published(tmp_path)
    assert manifest.verify(tmp_path) == 2
    assert manifest.verify(tmp_path, only=["metrics.json", "unlisted.txt"]) == 1
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(contract.ManifestMismatch, match=r"^model/model.safetensors: content differs"):
        manifest.verify(tmp_path)
    assert manifest.verify(tmp_path, only=["metrics.json"]) == 1
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(
        contract.ManifestMismatch, match=r"^metrics.json: listed in manifest.json but missing"
    ):
        manifest.verify(tmp_path, only=["metrics.json"])


def test_a_manifest_that_is_not_one_is_refused(tmp_path: Path) -> None:
    for text in (
        "",
        "[]",
        '{"files": {"a": {"sha256": "abc", "size": 1}}}',
        '{"files": {"a": {"size": -1}}}',
    ):
        with pytest.raises(contract.ManifestMismatch, match="manifest.json is not a valid manifest"):
            contract.ArtifactManifest.parse(text)
