"""The elastic data order (order.GlobalOrder) through Accelerate's own sharding: which examples each optimizer step
trains on does not depend on the world size, and a data position converts exactly between world sizes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetune.api.contract import ExitCode
from kubetune.api.models import FineTuneJobSpec
from kubetune_trainer.checkpoint import TRAINER_STATE_FILE, Checkpointer
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.order import GlobalOrder, items_per_step
from kubetune_trainer.state import TrainState
from kubetune_trainer.storage import ENV_CACHE_DIR, OutputStore
from trainer_helpers import job_spec


def steps_at(world: int, size: int, per_device: int, global_batch: int, epoch: int) -> list[set[int]]:
    """The examples of each optimizer step of an epoch, ranks together, as Accelerate shards the loader."""
    accumulation = global_batch // (per_device * world)
    order = GlobalOrder(size, seed=7, step_items=items_per_step(global_batch, per_device, per_device))
    order.set_epoch(epoch)
    batches = torch.utils.data.BatchSampler(order, per_device, drop_last=False)
    ranks = [list(BatchSamplerShard(batches, num_processes=world, process_index=r)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == order.steps() * accumulation
    return [
        {i for rank in ranks for batch in rank[s * accumulation : (s + 1) * accumulation] for i in batch}
        for s in range(order.steps())
    ]


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(12, 200),
    per_device=st.sampled_from([1, 2, 3]),
    steps_worth=st.sampled_from([1, 2]),
    epoch=st.integers(0, 3),
)
def test_each_step_trains_the_same_examples_at_three_two_and_one_ranks(
    size: int, per_device: int, steps_worth: int, epoch: int
) -> None:
    global_batch = per_device * 6 * steps_worth  # divides at 1, 2, 3 and 6 ranks
    if size < global_batch:
        return
    at = {world: steps_at(world, size, per_device, global_batch, epoch) for world in (1, 2, 3, 6)}
    assert at[3] == at[2] == at[1] == at[6]
    seen = [i for step in at[3] for i in step]
    assert (
        len(seen) == len(set(seen)) == size // global_batch * global_batch
    )  # none twice; only the tail left out


def test_each_epoch_is_another_permutation_and_the_left_out_tail_changes() -> None:
    order = GlobalOrder(40, seed=1, step_items=12)
    epochs = []
    for epoch in range(3):
        order.set_epoch(epoch)
        epochs.append(list(order))
    assert all(len(e) == 36 for e in epochs)
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])


def test_a_data_position_converts_exactly_between_world_sizes() -> None:
    # 2 steps at 3 ranks x 2 micro-batches = 12 micro-batches consumed = 6 per rank at 2 ranks (3 micro-batches a step)
    state = TrainState(step=2, batches_in_epoch=4, world_size=3)
    assert state.at_world_size(2).batches_in_epoch == 6 and state.world_size == 2
    assert state.at_world_size(3).batches_in_epoch == 4
    assert (
        TrainState(batches_in_epoch=5).at_world_size(2).batches_in_epoch == 5
    )  # not recorded: an older checkpoint


def _checkpointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_size: int, **distributed: Any
) -> Checkpointer:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    doc = job_spec(tmp_path, **{f"distributed.{k}": v for k, v in distributed.items()})
    spec = FineTuneJobSpec.model_validate(doc)
    acc = SimpleNamespace(is_main_process=True)
    checkpointer = Checkpointer(acc, OutputStore(spec.output.uri, spec.storage), "uid", world_size, 1, spec)
    local = checkpointer.local_dir(2)
    local.mkdir(parents=True)
    state = TrainState(step=2, batches_in_epoch=4, world_size=3)
    (local / TRAINER_STATE_FILE).write_text(json.dumps(vars(state)))
    return checkpointer


def test_an_elastic_job_continues_at_another_world_size_from_the_same_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = _checkpointer(tmp_path, monkeypatch, 2, nodes=3, minNodes=2, procsPerNode=1)
    state = checkpointer._state(checkpointer.store, 2, checkpointer.spec, new_run=False)  # type: ignore[arg-type]
    assert (state.batches_in_epoch, state.world_size) == (6, 2)


def test_a_fixed_size_job_refuses_a_checkpoint_of_another_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = _checkpointer(tmp_path, monkeypatch, 2, nodes=2, procsPerNode=1)
    with pytest.raises(TrainerError) as refused:
        checkpointer._state(checkpointer.store, 2, checkpointer.spec, new_run=False)  # type: ignore[arg-type]
    assert refused.value.exit_code == ExitCode.CONFIG_INVALID
    assert (
        "was trained by 3 processes and this gang has 2; only an elastic job (spec.distributed.minNodes)"
        in str(refused.value)
    )
