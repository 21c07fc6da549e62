"""status.usage: what a job used, accrued on every reconcile from what the operator saw the time before.

Between two looks nothing the figures depend on changes unseen: the phase changes only in derive(), and
every trainer pod that starts or stops wakes the job (a Pod event), so the interval since
`usage.updatedAt` is charged at the rates of the previous look:

- wall time: while the job was active (Pending, Initializing, Running, Restarting; not Suspended,
  not finished);
- node-seconds: `usage.runningPods` trainer pods Running (one pod per node);
- GPU-seconds: node-seconds x spec.distributed.gpusPerNode.

Restarts are included (their pods ran), suspended time is not. A look that changes none of the rates
outside Running leaves the figures as they were (no status write for nothing); the interval is charged
at the next change. While Running, the figures move on every look (progress is written then anyway). Each figure is added to the current run
(status.run) and to the total. The operator's price table (chart value `prices`) turns them into an
estimated cost: GPU-hours x the price of the GPU resource plus node-hours x the price of the node type
that spec.nodeSelector pins (the operator does not read Node objects).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.models import FineTuneJobSpec, Phase, RunUsage, Usage, UsageFigures
from kubetune.status.elastic import parse_time

ACTIVE: Final = frozenset({"Pending", "Initializing", "Running", "Restarting"})
GPU_RESOURCE: Final = "nvidia.com/gpu"  # what render asks for per node (spec.distributed.gpusPerNode)


class PriceTable(BaseModel):
    """Prices per hour, from the chart's values (`prices`): per GPU resource name and per node type."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    currency: str = Field(default="USD", min_length=1, max_length=8)
    gpu: dict[str, float] = Field(default_factory=dict)
    """Price of one GPU-hour by resource name, e.g. {"nvidia.com/gpu": 2.5}."""
    node_label: str | None = Field(default=None, alias="nodeLabel")
    """The node label whose value names the node type, e.g. node.kubernetes.io/instance-type."""
    node: dict[str, float] = Field(default_factory=dict)
    """Price of one node-hour by the node label's value, e.g. {"p4d.24xlarge": 32.77}."""

    def cost(self, spec: FineTuneJobSpec, figures: UsageFigures) -> float | None:
        """The estimated cost of `figures`, or None when the table prices nothing this job uses."""
        gpu = self.gpu.get(GPU_RESOURCE) if spec.distributed.gpus_per_node else None
        node_type = spec.node_selector.get(self.node_label) if self.node_label else None
        node = self.node.get(node_type) if node_type is not None else None
        if gpu is None and node is None:
            return None
        return round(
            figures.gpu_seconds / 3600 * (gpu or 0.0) + figures.node_seconds / 3600 * (node or 0.0), 4
        )


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def running_pods(pods: list[dict[str, Any]]) -> int:
    """Trainer pods Running now (each is one node of the gang)."""
    return sum(
        1
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    )


def _add(figures: UsageFigures, wall: float, node: float, gpu: float) -> dict[str, Any]:
    return {"wall_seconds": round(figures.wall_seconds + wall, 3), "node_seconds": round(figures.node_seconds + node, 3),
            "gpu_seconds": round(figures.gpu_seconds + gpu, 3)}  # fmt: skip


def accrue(old: Usage | None, old_phase: Phase | None, new_phase: Phase, pods: list[dict[str, Any]], spec: FineTuneJobSpec,
           run: int, now: datetime, prices: PriceTable | None = None) -> Usage:  # fmt: skip
    """The usage after this look: the interval since the last one charged at its rates, and the rates for the next."""
    old = old or Usage()
    pods_now = 0 if new_phase not in ACTIVE else running_pods(pods)
    if old.updated_at and old_phase == new_phase != "Running" and pods_now == old.running_pods:
        return old  # same rates: charged at the next change, so a look that changes nothing writes nothing
    since = parse_time(old.updated_at)
    seconds = max(0.0, (now - since).total_seconds()) if since is not None else 0.0
    wall = seconds if old_phase in ACTIVE else 0.0
    node = old.running_pods * seconds
    gpu = node * spec.distributed.gpus_per_node
    runs = list(old.runs)
    current = next((r for r in runs if r.run == run), None)
    if current is None:
        current = RunUsage(run=run)
        runs.append(current)
    current = current.model_copy(update=_add(current, wall, node, gpu))
    if prices is not None:
        current = current.model_copy(update={"estimated_cost": prices.cost(spec, current)})
    runs = [current if r.run == run else r for r in runs]
    total = Usage(**_add(old, wall, node, gpu), runs=runs, running_pods=pods_now, updated_at=_iso(now))
    if prices is not None:  # each run priced with its own spec; the total is their sum
        costs = [r.estimated_cost for r in runs if r.estimated_cost is not None]
        total = total.model_copy(
            update={"estimated_cost": round(sum(costs), 4) if costs else None, "currency": prices.currency}
        )
    return total
