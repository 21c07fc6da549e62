"""Verified resume: a checkpoint is checked against its manifest before it is loaded; one that fails is set
aside (renamed, kept) and the next older one is used; none usable fails the job with CheckpointInvalid (70);
a checkpoint trained by another config is refused by name, or (a new run, resumeFrom) gets the new config.

Real checkpoints: Accelerate's save_state of a small model and AdamW, sealed by the trainer's Checkpointer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.contract import ExitCode
from kubetune.api.models import FineTuneJobSpec, StorageSpec
from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.state import TrainState
from kubetune_trainer.storage import OutputStore
from trainer_helpers import job_spec


def spec_for(tmp: Path, **overrides: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(job_spec(tmp, **overrides))


class Job:
    """A model, its optimizer and schedule prepared by Accelerate, and a Checkpointer over a local output."""

    def __init__(self, tmp: Path, spec: FineTuneJobSpec, width: int = 8, key: str = "job"):
        from accelerate import Accelerator
        from transformers import get_scheduler

        torch.manual_seed(0)
        self.acc = Accelerator(cpu=True)
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.training.learning_rate)
        self.scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=100)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.store = OutputStore(str(tmp / "out"), StorageSpec())
        self.spec = spec
        self.checkpointer = ckpt.Checkpointer(self.acc, self.store, key, 1, keep=5, spec=spec)

    def train_and_save(self, step: int) -> dict[str, torch.Tensor]:
        """A few real optimizer steps, then a checkpoint at `step`; the weights it holds."""
        for _ in range(3):
            loss = self.model(torch.randn(4, self.model[0].in_features)).pow(2).mean()
            self.acc.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.checkpointer.save(TrainState(step=step, before={"evalLoss": 3.5}))
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def resume(self, previous: OutputStore | None = None) -> ckpt.Resumed | None:
        return self.checkpointer.resume(self.spec, previous, self.optimizer, self.scheduler)


def checkpoint_dir(tmp: Path, step: int) -> Path:
    return tmp / "out" / "checkpoints" / f"step-{step:08d}"


def weights_file(directory: Path) -> Path:
    return next(p for p in (directory / "accelerate").iterdir() if p.name.startswith("model"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sealed checkpoint (step 10), copied by each test that damages it."""
    tmp = tmp_path_factory.mktemp("sealed")
    Job(tmp, spec_for(tmp)).train_and_save(10)
    return checkpoint_dir(tmp, 10)


def test_a_sealed_checkpoint_verifies(sealed: Path) -> None:
    assert ckpt.verify_dir(sealed) is None
    assert (sealed / ckpt.TRAINED_SPEC_FILE).exists() and (sealed / ckpt.TRAINER_STATE_FILE).exists()


DAMAGE = st.sampled_from(["truncate", "flip", "append", "delete", "unlisted", "manifest"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    damage=DAMAGE,
    which=st.integers(min_value=0, max_value=10_000),
    where=st.integers(min_value=0, max_value=1 << 30),
)
def test_any_truncation_or_flipped_byte_fails_verification(
    sealed: Path, tmp_path_factory: pytest.TempPathFactory, damage: str, which: int, where: int
) -> None:
    copy = tmp_path_factory.mktemp("damaged") / "step"
    shutil.copytree(sealed, copy)
    files = ckpt.file_table_names(copy)
    target = copy / files[which % len(files)]
    size = target.stat().st_size
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: where % size])
    elif damage == "flip":
        flip_byte(target, where)
    elif damage == "append":
        target.write_bytes(target.read_bytes() + b"\0")
    elif damage == "delete":
        target.unlink()
    elif damage == "unlisted":
        (copy / "accelerate" / "random_states_1.pkl").write_bytes(b"x")
    else:
        flip_byte(copy / "manifest.json", where)
    assert ckpt.verify_dir(copy) is not None, (damage, target)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_older_one_loaded(tmp_path: Path) -> None:
    job = Job(tmp_path, spec_for(tmp_path))
    job.train_and_save(10)
    job.train_and_save(20)
    flip_byte(weights_file(checkpoint_dir(tmp_path, 20)), 4000)  # tensor bytes, COMPLETE still there

    resumed = Job(tmp_path, spec_for(tmp_path)).resume()

    assert resumed is not None and resumed.state.step == 10
    assert resumed.state.before == {"evalLoss": 3.5}
    aside = [p for p in (tmp_path / "out" / "checkpoints").iterdir() if ".set-aside-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith("step-00000020.set-aside-")
    assert (aside[0] / "COMPLETE").exists() and weights_file(aside[0]).exists()  # renamed, not deleted
    assert resumed.set_aside[0]["problem"].endswith("content differs from manifest.json (sha256)")
    assert not checkpoint_dir(tmp_path, 20).exists()
    assert ckpt.complete_checkpoints(OutputStore(str(tmp_path / "out"), StorageSpec())) == [10]
    assert resumed.checkpoint.endswith("checkpoints/step-00000010")


def test_resume_loads_exactly_the_verified_bytes(tmp_path: Path) -> None:
    job = Job(tmp_path, spec_for(tmp_path))
    older = job.train_and_save(10)
    job.train_and_save(20)
    state_file = checkpoint_dir(tmp_path, 20) / ckpt.TRAINER_STATE_FILE
    state_file.write_text(state_file.read_text()[:7])  # an unreadable trainer_state.json (the data position)

    again = Job(tmp_path, spec_for(tmp_path))
    assert again.resume() is not None
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, older[name]), name


def test_no_usable_checkpoint_fails_with_checkpoint_invalid_naming_each(tmp_path: Path) -> None:
    job = Job(tmp_path, spec_for(tmp_path))
    job.train_and_save(10)
    job.train_and_save(20)
    weights = weights_file(checkpoint_dir(tmp_path, 10))
    weights.write_bytes(weights.read_bytes()[:100])
    (checkpoint_dir(tmp_path, 20) / "manifest.json").write_text("{")

    with pytest.raises(TrainerError) as caught:
        Job(tmp_path, spec_for(tmp_path)).resume()

    assert caught.value.exit_code == ExitCode.CHECKPOINT_INVALID == 71
    message = caught.value.message
    assert (
        "step-00000020: manifest.json is not a valid manifest" in message
        and f"step-00000010: accelerate/{weights.name}: content differs from manifest.json (size 100"
        in message
    )
    assert len([p for p in (tmp_path / "out" / "checkpoints").iterdir() if ".set-aside-" in p.name]) == 2
    assert (
        Job(tmp_path, spec_for(tmp_path)).resume() is None
    )  # the next run trains from the start, the damaged ones kept


def test_a_changed_config_is_refused_naming_the_fields_and_the_ways_forward(tmp_path: Path) -> None:
    Job(tmp_path, spec_for(tmp_path)).train_and_save(10)
    changed = spec_for(
        tmp_path, **{"training.learningRate": 0.001, "training.maxSteps": 60, "output.keepCheckpoints": 4}
    )

    with pytest.raises(TrainerError) as caught:
        Job(tmp_path, changed).resume()

    message = caught.value.message
    assert caught.value.exit_code == ExitCode.CONFIG_INVALID
    assert (
        "spec.training.learningRate: 0.005 -> 0.001" in message
        and "spec.training.maxSteps: 30 -> 60" in message
    )
    assert "keepCheckpoints" not in message  # where results go is not what was trained
    assert "new output" in message and "resumeFrom: previous" in message and "--resume-from" in message


def test_unchanged_config_resumes(tmp_path: Path) -> None:
    Job(tmp_path, spec_for(tmp_path)).train_and_save(10)
    resumed = Job(
        tmp_path, spec_for(tmp_path, **{"training.loggingSteps": 1, "output.checkpointSteps": 3})
    ).resume()
    assert resumed is not None and resumed.changes == []


def test_a_new_run_from_previous_trains_with_the_new_learning_rate(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    Job(first, spec_for(first)).train_and_save(10)
    second = tmp_path / "second"
    second.mkdir()
    job = Job(
        second,
        spec_for(second, **{"training.learningRate": 0.001, "dataset.train": str(first / "train.jsonl")}),
    )

    resumed = job.resume(previous=OutputStore(str(first / "out"), StorageSpec()))

    assert resumed is not None and resumed.state.step == 10
    assert resumed.changes == ["spec.training.learningRate: 0.005 -> 0.001"]
    assert [g["initial_lr"] for g in job.optimizer.param_groups] == [0.001]
    assert job.scheduler.base_lrs == [0.001]
    lam = job.scheduler.lr_lambdas[0](job.scheduler.last_epoch)
    assert job.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * lam)


def test_a_checkpoint_of_another_shape_is_a_config_error_with_the_whole_message(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    Job(first, spec_for(first)).train_and_save(10)
    second = tmp_path / "second"
    second.mkdir()
    job = Job(
        second, spec_for(second, **{"lora.r": 16, "dataset.train": str(first / "train.jsonl")}), width=16
    )

    with pytest.raises(TrainerError) as caught:
        job.resume(previous=OutputStore(str(first / "out"), StorageSpec()))

    assert caught.value.exit_code == ExitCode.CONFIG_INVALID  # not 75: a restart cannot help
    assert (
        "does not fit this job's model" in caught.value.message
        and "spec.lora.r: 8 -> 16" in caught.value.message
    )


def test_a_long_termination_message_keeps_its_start() -> None:
    from kubetune.api.contract import MESSAGE_LIMIT, TerminationMessage

    long = "checkpoint does not fit: " + "x" * 5000 + " the model is torch.Size([64, 16])"
    text = TerminationMessage.build(64, long).message
    assert (
        len(text) <= MESSAGE_LIMIT
        and text.startswith("checkpoint does not fit")
        and text.endswith("torch.Size([64, 16])")
    )


def test_trained_spec_is_part_of_the_manifest(sealed: Path) -> None:
    manifest = json.loads((sealed / "manifest.json").read_text())
    assert ckpt.TRAINED_SPEC_FILE in manifest["files"] and ckpt.TRAINER_STATE_FILE in manifest["files"]
