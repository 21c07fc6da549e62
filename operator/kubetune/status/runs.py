"""Runs: a finished FineTuneJob whose trained fields are edited (GitOps) trains again. Pure.

The status remembers a fingerprint of what the current run trains. Once the job has finished, an edit that
changes it (data, hyper-parameters, method, steps, ...) closes the run into `status.runs[]` and starts the
next one: its own output prefix, a fresh status, and (with `spec.output.resumeFrom: previous`) the previous
run's newest checkpoint to start from. Edits that change nothing trained (TTL, labels) start nothing.
While a run is active the API server's CEL rule keeps those fields frozen.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from kubetune.api.models import _IMMUTABLE, FineTuneJobSpec, RunRecord
from kubetune.status import conditions as c
from kubetune.status.derive import TERMINAL, iso

NEW_RUN_REASON = "NewRun"


def trained_hash(spec: FineTuneJobSpec) -> str:
    """Fingerprint of the fields that decide what is trained (resumeFrom only says how to start)."""
    data = spec.model_dump(mode="json", by_alias=True, include=set(_IMMUTABLE))
    data.get("output", {}).pop("resumeFrom", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_uri(base: str, run: int) -> str:
    """Run 1 writes to spec.output.uri itself; run n to `<uri>/run-<n>`."""
    return base if run <= 1 else f"{base.rstrip('/')}/run-{run}"


def for_run(spec: FineTuneJobSpec, status: dict[str, Any]) -> FineTuneJobSpec:
    """The spec as the current run trains it: its output at the run's own prefix."""
    run = int(status.get("run") or 1)
    if run <= 1:
        return spec
    return spec.model_copy(update={"output": spec.output.model_copy(update={"uri": run_uri(spec.output.uri, run)})})


def needs_new_run(spec: FineTuneJobSpec, status: dict[str, Any]) -> bool:
    """Finished, and the spec now asks for something else to be trained."""
    recorded = status.get("trainedSpecHash")
    return status.get("phase") in TERMINAL and bool(recorded) and recorded != trained_hash(spec)


def start_new_run(spec: FineTuneJobSpec, generation: int | None, old: dict[str, Any], now: datetime) -> tuple[dict[str, Any], tuple[str, str, str]]:
    """The status of run n+1 (Pending, no gang yet) with run n recorded, and its Event."""
    ts = iso(now)
    run = int(old.get("run") or 1)
    record = RunRecord(
        run=run,
        generation=_run_generation(old),
        start_time=old.get("startTime"),
        completion_time=old.get("completionTime"),
        outcome="Succeeded" if old.get("phase") == "Succeeded" else "Failed",
        message=old.get("message"),
        uri=old.get("runUri") or run_uri(spec.output.uri, run),
        resumed_from=old.get("resumedFrom"),
        artifacts=old.get("artifacts"),
    ).model_dump(mode="json", by_alias=True, exclude_none=True)
    nxt = run + 1
    resumed = (old.get("runUri") or run_uri(spec.output.uri, run)) if spec.output.resume_from == "previous" else None
    message = (
        f"Run {nxt} for spec generation {generation}: "
        + (f"resuming from run {run}'s last checkpoint" if resumed else "training from the start")
        + f"; writing to {run_uri(spec.output.uri, nxt)}"
    )
    conds = list(old.get("conditions") or [])
    for type_ in (c.SUCCEEDED, c.FAILED):
        if c.get_condition(conds, type_) is not None:
            conds = c.set_condition(conds, type_, False, NEW_RUN_REASON, message, ts, generation)
    conds = c.set_condition(conds, c.RUNNING, False, NEW_RUN_REASON, message, ts, generation)
    status: dict[str, Any] = {
        "phase": "Pending",
        "message": message,
        "observedGeneration": generation,
        "restarts": 0,
        "run": nxt,
        "runUri": run_uri(spec.output.uri, nxt),
        "trainedSpecHash": trained_hash(spec),
        "runGeneration": generation,
        "conditions": conds,
        "runs": [*list(old.get("runs") or []), record],
        # Cleared for the new run (a merge patch removes keys set to None).
        "startTime": None,
        "completionTime": None,
        "progress": None,
        "artifacts": None,
        "lastFailure": None,
        "resumedFrom": resumed,
    }
    return status, ("Normal", NEW_RUN_REASON, message)


def _run_generation(status: dict[str, Any]) -> int | None:
    gen = status.get("runGeneration", status.get("observedGeneration"))
    return int(gen) if gen is not None else None
