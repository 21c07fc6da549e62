"""The `kubetune get` table: pure rows from FineTuneJobs, rendered by rich (live with -w)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kubetune.api.models import FineTuneJob
from kubetune.client.jobs import phase_of, progress_of
from kubetune.status.progress import format_eta

COLUMNS = ("NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "TOKENS/S", "ETA", "RESTARTS", "AGE")


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
        "STEP": f"{p.step}/{p.total_steps}" if p and p.step is not None and p.total_steps else (str(p.step) if p and p.step is not None else ""),
        "LOSS": f"{p.loss:.4f}" if p and p.loss is not None else "",
        "TOKENS/S": f"{p.tokens_per_second:,.0f}" if p and p.tokens_per_second is not None else "",
        "ETA": (p.eta or "") if p and phase not in ("Succeeded", "Failed") else "",
        "RESTARTS": str(job.status.restarts if job.status else 0),
        "AGE": age(meta.get("creationTimestamp"), now),
    }


def bar(percent: float | None, width: int = 20) -> str:
    if percent is None:
        return ""
    done = int(round(width * min(max(percent, 0.0), 100.0) / 100.0))
    return "█" * done + "░" * (width - done) + f" {percent:5.1f}%"


PHASE_STYLE = {"Succeeded": "green", "Failed": "bold red", "Running": "cyan", "Restarting": "yellow", "Suspended": "magenta"}


def render(jobs: list[FineTuneJob], now: datetime | None = None) -> Any:
    from rich.table import Table

    now = now or datetime.now(timezone.utc)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in COLUMNS:
        table.add_column(col, no_wrap=True, justify="right" if col in ("LOSS", "TOKENS/S", "RESTARTS") else "left")
    for job in sorted(jobs, key=lambda j: j.metadata.name or ""):
        r = row(job, now)
        cells = [str(r[c]) if c != "PROGRESS" else bar(r[c]) for c in COLUMNS]
        cells[1] = f"[{PHASE_STYLE.get(r['PHASE'], 'white')}]{r['PHASE']}[/]"
        table.add_row(*cells)
    return table
