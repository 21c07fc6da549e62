"""One optimizer step's micro-batches, its exact token-weighted loss, and flags read without stalling the GPU.

Token-weighted loss: every labelled token of an optimizer step weighs the same, whatever micro-batch
or rank it landed in. Each micro-batch's loss is its *sum* over tokens divided by the step's token
count N over all ranks, scaled by world x accumulation because DDP (or DeepSpeed) averages gradients
over ranks and Accelerate divides each micro-batch's loss by the accumulation steps. So the model gets
`num_items_in_batch = N / (world x accumulation)` and the gradients are d(sum of all token losses)/N,
the same as one big batch. The count is all-reduced on the device; nothing is read back.

Flags (a non-finite loss, a SIGTERM, a checkpoint request to rank 0) are all-reduced on the device every step. Where the optimizer
can skip a step on the device (fused AdamW's `found_inf`), they are read back one step late, so the
host never waits for the GPU inside a step: a bad step is skipped by the kernel, and the trainer
stops at the next one. Elsewhere (CPU, DeepSpeed) they are read before the update, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from kubetune_trainer.batching import label_count


def optimizer_steps(loader: Iterable[dict[str, Any]], accumulation: int) -> Iterator[list[dict[str, Any]]]:
    """The loader's micro-batches in groups of `accumulation`; the epoch's last group may be shorter."""
    group: list[dict[str, Any]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def step_denominator(
    group: list[dict[str, Any]], world: int, accumulation: int, device: torch.device
) -> torch.Tensor:
    """num_items_in_batch for each micro-batch of this step (see the module docstring)."""
    tokens = torch.stack([label_count(b).to(device) for b in group]).sum().float()
    total = all_reduce(tokens).clamp(min=1)
    return total / (world * accumulation)


def lm_loss(model: Any, denominator: torch.Tensor) -> Callable[[dict[str, Any]], torch.Tensor]:
    """The language-model loss of a micro-batch as its token sum over the step's share (see the module docstring)."""
    return lambda batch: model(**batch, num_items_in_batch=denominator, use_cache=False).loss


def forward_backward(
    accelerator: Any,
    model: Any,
    group: list[dict[str, Any]],
    loss_of: Callable[[dict[str, Any]], torch.Tensor],
) -> list[torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches; gradients are synchronised after the last
    (we mark the step's boundary ourselves: the epoch's last group may be short). Returns the detached losses."""
    losses = []
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = loss_of(batch)
            accelerator.backward(loss)
        losses.append(loss.detach().float())
    return losses


def flags(nonfinite: torch.Tensor, stop: bool, checkpoint: bool = False) -> torch.Tensor:
    """[any rank saw a non-finite loss, any rank got SIGTERM, rank 0 was asked for a checkpoint], as 0/1 floats on
    the device (not read back): one all-reduce tells every rank, so all act at the same step."""
    asked = [float(stop), float(checkpoint)]
    t = torch.cat([(nonfinite > 0).float().reshape(1), torch.tensor(asked, device=nonfinite.device)])
    return all_reduce(t, torch.distributed.ReduceOp.MAX) if torch.distributed.is_initialized() else t


def skips_on_device(optimizer: Any) -> bool:
    """A fused torch optimizer that takes `found_inf` and skips its update on the device."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(inner, "defaults", {}).get("fused")) and getattr(
        inner, "_step_supports_amp_scaling", False
    )


def set_found_inf(optimizer: Any, step_flags: torch.Tensor | None) -> None:
    """Fused AdamW skips its update (on the device) when found_inf is nonzero; None clears it."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = None if step_flags is None else step_flags[0].clone()
