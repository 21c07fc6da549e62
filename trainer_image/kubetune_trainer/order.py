"""The data order of an elastic run (spec.distributed.minNodes): a function of the seed, the epoch and how many
examples were consumed, never of the world size.

Each epoch is one permutation of the training items (seeded by seed and epoch), cut to whole optimizer steps:
`steps x step_items` items, where step_items is the global batch in loader items (sequences, or token-budget
micro-batches with varlen attention). The last `len mod step_items` items of the permutation, different ones each
epoch, are left out of that epoch at every world size (they would otherwise make a short last step, or a wrapped-
around one that repeats examples). Accelerate hands the loader's micro-batches to the ranks in turn (micro-batch j
to rank j mod world), so optimizer step s of an epoch trains on micro-batches [s x W x A, (s + 1) x W x A) of the
permutation whatever the world size W and accumulation A, as long as W x A (the global batch) stays the same; a
checkpoint taken after step s resumes, at any world size, at the same example.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class GlobalOrder(torch.utils.data.Sampler[int]):
    """Indices of one epoch's permutation, cut to whole global batches; set_epoch picks the permutation."""

    def __init__(self, size: int, seed: int, step_items: int):
        super().__init__()
        if step_items < 1 or size < step_items:
            raise ValueError(f"{size} training items are fewer than one optimizer step's {step_items}")
        self.size, self.seed, self.step_items, self.epoch = size, seed, step_items, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return self.size // self.step_items

    def __len__(self) -> int:
        return self.steps() * self.step_items

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        )
        return iter(order[: len(self)].tolist())


def items_per_step(global_batch: int, per_device_batch: int, loader_batch: int) -> int:
    """Loader items per optimizer step over all ranks: the global batch in micro-batches, times the loader's batch
    size (perDeviceBatchSize sequences, or 1 token-budget micro-batch with varlen attention)."""
    return global_batch // per_device_batch * loader_batch
