"""Elastic resume (spec.distributed.minNodes): at which node counts a gang may train, and with what accumulation.

The global batch stays what the spec says at every size: `training.globalBatchSize`, or perDeviceBatchSize x
nodes x procsPerNode when it is unset. At n nodes the gradient accumulation is global / (perDeviceBatchSize x
n x procsPerNode); a node count at which that is not a whole number is never used (the gang waits, or takes the
next smaller count that divides). Pure functions, shared by the operator, `kubetune validate` and the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec

RESHARDABLE_ZERO_STAGES: Final[tuple[int, ...]] = (1, 2, 3)
"""DeepSpeed ZeRO stages whose checkpoints load at another world size, through DeepSpeed's universal checkpoint
(tests/trainer/test_elastic.py); DDP's always do: the model and optimizer state are whole on every rank. With
optimizer or parameter offload the conversion is not proven: minNodes is refused with either."""


def global_batch(spec: FineTuneJobSpec) -> int:
    """Sequences per optimizer step, at every world size the gang trains at."""
    t, d = spec.training, spec.distributed
    return t.global_batch_size or t.per_device_batch_size * d.nodes * d.procs_per_node


def divides(spec: FineTuneJobSpec, nodes: int) -> bool:
    return (
        global_batch(spec) % (spec.training.per_device_batch_size * nodes * spec.distributed.procs_per_node)
        == 0
    )


def node_counts(spec: FineTuneJobSpec) -> list[int]:
    """The node counts the gang may train on, largest first: `nodes`, then each count down to minNodes at which
    the global batch divides evenly."""
    d = spec.distributed
    low = d.min_nodes if d.elastic and d.min_nodes is not None else d.nodes
    return [n for n in range(d.nodes, low - 1, -1) if n == d.nodes or divides(spec, n)]


def nodes_for(spec: FineTuneJobSpec, placeable: int) -> int | None:
    """The largest node count the gang may train on with `placeable` nodes; None when fewer than minNodes."""
    return next((n for n in node_counts(spec) if n <= placeable), None)


def accumulation(spec: FineTuneJobSpec, nodes: int | None = None) -> int:
    """Gradient accumulation steps at `nodes` nodes (default: all of them)."""
    n = spec.distributed.nodes if nodes is None else nodes
    micro = spec.training.per_device_batch_size * n * spec.distributed.procs_per_node
    gbs = global_batch(spec)
    if gbs % micro:
        raise ValueError(
            f"spec.training.globalBatchSize ({gbs}) must be a multiple of perDeviceBatchSize x world size ({micro})"
        )
    return gbs // micro
