"""`kubetune describe NAME [-o yaml|json|wide|name]`: phase, progress, conditions, the last failure, artifacts
and the last Events (-o wide: every Event; yaml/json/name: the object, as `kubetune get -o`)."""

from __future__ import annotations

import argparse
from typing import Any

from kubetune.api.models import FineTuneJob, NetworkReport, Usage
from kubetune.cli.cluster_args import add_cluster_args, client_from, guarded, print_objects
from kubetune.client.jobs import artifacts_of, phase_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="FineTuneJob name")
    add_cluster_args(parser, output="the description; wide: with every Event")


# Events the description shows (the newest); -o wide shows them all.
RECENT_EVENTS = 15


def describe(job: FineTuneJob, events: list[dict[str, Any]], recent: int | None = RECENT_EVENTS) -> str:
    """The text `kubetune describe` prints (pure)."""
    st = job.status
    spec = job.spec
    lines = [f"Name:         {job.metadata.name}", f"Namespace:    {job.metadata.namespace}",
             f"Phase:        {phase_of(job)}"]  # fmt: skip
    if st and st.message:
        lines.append(f"Message:      {st.message}")
    if hasattr(spec, "method"):
        lines.append(
            f"Method:       {spec.method}, {spec.distributed.nodes} node(s) x {spec.distributed.procs_per_node} process(es)"
        )
        lines.append(f"Model:        {spec.model.source}")
        lines.append(f"Output:       {spec.output.uri}")
    if st:
        lines += [f"Restarts:     {st.restarts}", f"Started:      {st.start_time or '-'}",
                  f"Completed:    {st.completion_time or '-'}", f"Workload:     {st.workload or '-'}"]  # fmt: skip
    p = st.progress if st else None
    if p:
        lines.append("Progress:")
        for label, value in (("Step", f"{p.step}/{p.total_steps}" if p.step is not None else None),
                             ("Percent", p.percent), ("Epoch", p.epoch), ("Loss", p.loss), ("Eval loss", p.eval_loss),
                             ("Learning rate", p.learning_rate), ("Tokens/s", p.tokens_per_second), ("ETA", p.eta),
                             ("Updated", p.updated_at)):  # fmt: skip
            if value is not None:
                lines.append(f"  {label + ':':<15}{value}")
    if st and st.conditions:
        lines.append("Conditions:")
        lines.append(f"  {'TYPE':<12}{'STATUS':<8}{'REASON':<24}MESSAGE")
        for c in st.conditions:
            lines.append(f"  {c.type:<12}{c.status:<8}{c.reason:<24}{c.message}")
    if st and st.last_checkpoint:
        ck = st.last_checkpoint
        lines.append(f"Last checkpoint: step {ck.step} at {ck.time}: {ck.uri}")
    if st and st.last_failure:
        f = st.last_failure
        lines.append("Last failure:")
        lines.append(f"  Pod {f.pod}, exit code {f.exit_code} ({f.reason}): {f.message}")
    if hasattr(spec, "output"):
        arts = artifacts_of(job)
        lines.append("Artifacts:" + ("" if phase_of(job) == "Succeeded" else " (when it succeeds)"))
        for label, value in (("Merged model", arts.merged_model), ("Adapter", arts.adapter), ("Checkpoints", arts.checkpoint),
                             ("Metrics", arts.metrics), ("Manifest", arts.manifest)):  # fmt: skip
            if value:
                lines.append(f"  {label + ':':<15}{value}")
    if st and st.serving:
        lines.append(f"Serving:      {st.serving.kind} {st.serving.name} ({st.serving.uri or '-'})")
    if st and st.tracking:
        t = st.tracking
        for label, value in (
            ("MLflow run", t.mlflow_run),
            ("Registered", t.mlflow_model_version),
            ("W&B run", t.wandb_run),
        ):
            if value:
                lines.append(f"{label + ':':<14}{value}")
    if st and st.usage:
        lines += usage_lines(st.usage)
    if st and st.network:
        lines.append(f"Network:      {network_line(st.network)}")
    lines.append("Events:" + ("" if events else " <none>"))
    for e in events[-recent:] if recent else events:
        when = e.get("lastTimestamp") or e.get("eventTime") or ""
        lines.append(f"  {when:<22}{e.get('type', ''):<9}{e.get('reason', ''):<20}{e.get('message', '')}")
    return "\n".join(lines)


def network_line(n: NetworkReport) -> str:
    """status.network on one line: the all-reduce, the slowest pair and the highest latency."""
    reduce = f"all-reduce of {n.megabytes} MB {n.all_reduce_ms} ms ({n.all_reduce_bus_gbps} GB/s bus)"
    return (
        f"{n.backend}, {n.world_size} ranks: {reduce}, slowest pair {n.min_bandwidth_gbps} GB/s, "
        f"highest latency {n.max_latency_ms} ms (checked {n.checked_at or '-'})"
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def usage_lines(usage: Usage) -> list[str]:
    """status.usage as a table: the total and each run (GPU and node time, wall time, the estimated cost)."""
    cost = usage.currency or ""
    rows = (
        [("total", usage), *((f"run {r.run}", r) for r in usage.runs)]
        if len(usage.runs) > 1
        else [("total", usage)]
    )
    out = ["Usage:", f"  {'':<8}{'GPU':>10}{'NODE':>10}{'WALL':>10}{'EST. COST':>12}"]
    for label, f in rows:
        price = f"{f.estimated_cost:.2f} {cost}".strip() if f.estimated_cost is not None else "-"
        out.append(
            f"  {label:<8}{_hours(f.gpu_seconds):>10}{_hours(f.node_seconds):>10}{_hours(f.wall_seconds):>10}{price:>12}"
        )
    return out


@guarded
def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    job = client.get(args.name)
    if args.output in ("yaml", "json", "name"):
        print_objects([job], args.output, single=True)
    else:
        print(
            describe(job, client.events(args.name), recent=None if args.output == "wide" else RECENT_EVENTS)
        )
    return 0
