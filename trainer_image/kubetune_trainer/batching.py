"""Micro-batches by token budget, each collated into one flattened row (no padding computed).

A micro-batch is a group of whole examples whose lengths add up to at most the budget
(perDeviceBatchSize x maxSeqLength tokens). Examples are shuffled once with the seed, then placed
first-fit into a few open groups, so micro-batches come out nearly full on ragged data and mixed in
length. The collator concatenates a group into one row: position_ids restart at 0 for each example,
`cu_seq_lens_q/k` (int32) mark where each starts, and `max_length_q/k` is the constant maxSeqLength,
so the attention kernel needs nothing read back from the device (attention.py). Packed examples
(data.pack) are split back into their examples the same way, by their position_ids restarts.

The first label of every example is ignored: in one row, position t predicts the label at t+1, and
the last token of one example must not be trained to predict the next example's first token. An
example alone never uses its first label either, so the loss is the same as running it alone.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from kubetune_trainer.data import IGNORE, Example

OPEN_GROUPS = 8  # groups kept open for first-fit; more fills slightly better and costs linear time


def group_by_tokens(lengths: list[int], budget: int, seed: int | None = None) -> list[list[int]]:
    """Indices of examples, grouped so each group's lengths add up to at most `budget` (an example
    longer than the budget goes alone). Shuffled with `seed` first when one is given."""
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    done: list[list[int]] = []
    open_groups: list[tuple[int, list[int]]] = []  # (tokens, indices)
    for i in order:
        n = lengths[i]
        for slot, (used, members) in enumerate(open_groups):
            if used + n <= budget:
                members.append(i)
                open_groups[slot] = (used + n, members)
                break
        else:
            if len(open_groups) == OPEN_GROUPS:
                fullest = max(range(len(open_groups)), key=lambda s: open_groups[s][0])
                done.append(open_groups.pop(fullest)[1])
            open_groups.append((n, [i]))
    done.extend(members for _, members in open_groups)
    return done


def micro_batches(examples: list[Example], budget: int, seed: int | None = None) -> list[list[Example]]:
    return [
        [examples[i] for i in group]
        for group in group_by_tokens([len(e.input_ids) for e in examples], budget, seed)
    ]


def flatten(batch: list[Example], max_length: int) -> dict[str, Any]:
    """One row: input_ids, labels, position_ids (1 x T) and the varlen keyword arguments."""
    ids = [t for e in batch for t in e.input_ids]
    positions = [p for e in batch for p in e.position_ids]
    labels = [IGNORE if p == 0 else y for e in batch for p, y in zip(e.position_ids, e.labels, strict=True)]
    starts = [i for i, p in enumerate(positions) if p == 0]
    cu = torch.tensor([*starts, len(ids)], dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if len(starts) else 0
    if longest > max_length:
        raise ValueError(f"an example of {longest} tokens is longer than maxSeqLength {max_length}")
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


class Flatten:
    """The DataLoader's collate_fn over a dataset of micro-batches (batch_size 1); picklable for workers."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, items: list[list[Example]]) -> dict[str, Any]:
        return flatten([e for group in items for e in group], self.max_length)


def label_count(batch: dict[str, Any]) -> torch.Tensor:
    """Tokens that carry a loss (labels are shifted by one inside the model)."""
    count: torch.Tensor = (batch["labels"][..., 1:] != IGNORE).sum()
    return count
