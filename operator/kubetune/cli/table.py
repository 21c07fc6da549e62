"""The `kubetune get` table: pure rows from FineTuneJobs, rendered by rich (live with -w)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kubetune.api.models import FineTuneJob
from kubetune.client.jobs import phase_of, progress_of
from kubetune.status.progress import format_eta

COLUMNS = ("NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "TOKENS/S", "ETA", "RESTARTS", "AGE")
WIDE = ("METHOD", "NODES", "GPUS/NODE", "MODEL")  # -o wide, after the columns above


def age(created: str | None, now: datetime) -> str:
    if not created:
        return ""
    try:
        t = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return format_eta(max(0.0, (now - t).total_seconds())) or "0s"


def row(job: FineTuneJob, now: datetime) -> dict[str, Any]:
    """One job as the table shows it (percent kept as a number for the bar)."""
    p = progress_of(job)
    phase = phase_of(job)
    percent = p.percent if p and p.percent is not None else (100.0 if phase == "Succeeded" else None)
    meta = job.metadata.model_extra or {}
    return {
        "NAME": job.metadata.name or "",
        "PHASE": phase,
        "PROGRESS": percent,
        "STEP": f"{p.step}/{p.total_steps}"
        if p and p.step is not None and p.total_steps
        else (str(p.step) if p and p.step is not None else ""),
        "LOSS": f"{p.loss:.4f}" if p and p.loss is not None else "",
        "TOKENS/S": f"{p.tokens_per_second:,.0f}" if p and p.tokens_per_second is not None else "",
        "ETA": (p.eta or "") if p and phase not in ("Succeeded", "Failed") else "",
        "RESTARTS": str(job.status.restarts if job.status else 0),
        "AGE": age(meta.get("creationTimestamp"), now),
        "NAMESPACE": job.metadata.namespace or "",
        **wide_cells(job),
    }


def wide_cells(job: FineTuneJob) -> dict[str, str]:
    """The -o wide columns (empty for a job whose spec the API models could not read)."""
    spec = job.spec
    if not hasattr(spec, "distributed"):
        return dict.fromkeys(WIDE, "")
    d = spec.distributed
    return {"METHOD": spec.method, "NODES": f"{d.nodes}x{d.procs_per_node}", "GPUS/NODE": str(d.gpus_per_node),
            "MODEL": spec.model.source}  # fmt: skip


def bar(percent: float | None, width: int = 20) -> str:
    if percent is None:
        return ""
    done = int(round(width * min(max(percent, 0.0), 100.0) / 100.0))
    return "█" * done + "░" * (width - done) + f" {percent:5.1f}%"


PHASE_STYLE = {
    "Succeeded": "green",
    "Failed": "bold red",
    "Running": "cyan",
    "Restarting": "yellow",
    "Suspended": "magenta",
}


def columns(wide: bool = False, namespaces: bool = False) -> tuple[str, ...]:
    """The table's columns: NAMESPACE first with -A (as kubectl), the WIDE ones last with -o wide."""
    return (("NAMESPACE",) if namespaces else ()) + COLUMNS + (WIDE if wide else ())


def render(
    jobs: list[FineTuneJob], now: datetime | None = None, wide: bool = False, namespaces: bool = False
) -> Any:
    from rich.markup import escape
    from rich.table import Table

    now = now or datetime.now(timezone.utc)
    cols = columns(wide, namespaces)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in cols:
        table.add_column(
            col, no_wrap=True, justify="right" if col in ("LOSS", "TOKENS/S", "RESTARTS") else "left"
        )
    for job in sorted(jobs, key=lambda j: (j.metadata.namespace or "", j.metadata.name or "")):
        r = row(job, now)
        cells = [bar(r[c]) if c == "PROGRESS" else escape(str(r[c])) for c in cols]
        cells[cols.index("PHASE")] = f"[{PHASE_STYLE.get(r['PHASE'], 'white')}]{r['PHASE']}[/]"
        table.add_row(*cells)
    return table
