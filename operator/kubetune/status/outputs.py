"""Owned outputs on a cluster: two live FineTuneJobs never write to one output. Pure.

A job whose output (its current run's URI) is the same as, inside, or around the output of another live job
that came first (creationTimestamp, then namespace/name) waits with the condition Running=False, reason
OutputInUse, and starts once that job has finished. A job its spec suspends (runPolicy.suspend) shows Suspended
while it waits, with the same condition: what the user asked for, and why it could not start if resumed now. The
trainer refuses, from the owner record the first run wrote, an output that a finished job of another uid owns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubetune.api.models import FineTuneJobStatus
from kubetune.api.validation import outputs_overlap
from kubetune.status import conditions as c
from kubetune.status.derive import TERMINAL, iso, phase_conditions


def output_of(body: dict[str, Any]) -> str | None:
    """Where the job's current run writes: status.runUri once set, else spec.output.uri."""
    status, spec = body.get("status") or {}, body.get("spec") or {}
    uri = status.get("runUri") or (spec.get("output") or {}).get("uri")
    return uri if isinstance(uri, str) and uri else None


def _live(body: dict[str, Any]) -> bool:
    return (
        not body["metadata"].get("deletionTimestamp")
        and (body.get("status") or {}).get("phase") not in TERMINAL
    )


def _order(body: dict[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return (
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
    )


def holder(body: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The live job, created before `body`, whose output overlaps body's; None when the output is free."""
    mine = output_of(body)
    if mine is None:
        return None
    uid = body["metadata"].get("uid")
    earlier = [
        other for other in others
        if other["metadata"].get("uid") != uid and _live(other) and _order(other) < _order(body)
        and (theirs := output_of(other)) is not None and outputs_overlap(mine, theirs)
    ]  # fmt: skip
    return min(earlier, key=_order) if earlier else None


OUTPUT_RECHECK_SECONDS = 30.0
"""How often a waiting job looks again (the holder finishing does not wake it)."""


def waiting_status(
    old: FineTuneJobStatus,
    body: dict[str, Any],
    holding: dict[str, Any],
    generation: int | None,
    now: datetime,
    suspended: bool = False,
) -> FineTuneJobStatus:
    """Pending (Suspended when its spec suspends it), with Running=False (OutputInUse) naming the job that holds
    the output and the fix."""
    meta = holding["metadata"]
    message = c.reason_message(
        c.Reason.OUTPUT_IN_USE, uri=output_of(body), holder=f"{meta.get('namespace')}/{meta.get('name')}",
        theirs=output_of(holding), phase=(holding.get("status") or {}).get("phase") or "Pending", every=int(OUTPUT_RECHECK_SECONDS),
    )  # fmt: skip
    phase = "Suspended" if suspended else "Pending"
    conds = phase_conditions(old.conditions, phase, c.Reason.OUTPUT_IN_USE, message, iso(now), generation)
    return old.model_copy(
        update={
            "phase": phase,
            "message": message,
            "observed_generation": generation,
            "conditions": conds,
        }
    )
