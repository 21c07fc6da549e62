"""Runs: a finished FineTuneJob whose trained fields are edited (GitOps) trains again. Pure.

The status remembers a fingerprint of what the current run trains. Once the job has finished, an edit that
changes it (data, hyper-parameters, method, steps, ...) closes the run into `status.runs[]` and starts the
next one: its own output prefix, a fresh status, and (with `spec.output.resumeFrom: previous`) the previous
run's newest checkpoint to start from. Edits that change nothing trained (TTL, labels) start nothing.
While a run is active the API server's CEL rule keeps those fields (kubetune.api.TRAINED_FIELDS) frozen.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from kubetune.api.models import TRAINED_FIELDS, FineTuneJobSpec, FineTuneJobStatus, RunRecord
from kubetune.status import conditions as c
from kubetune.status.derive import TERMINAL, iso

NEW_RUN_REASON = c.Reason.NEW_RUN


_TRAINED = {
    name for name, info in FineTuneJobSpec.model_fields.items() if (info.alias or name) in TRAINED_FIELDS
}
# Trained fields added after fingerprints were first recorded, by block (snake_case): left out while at their
# default, so that a finished job's fingerprint stays what it was and an upgraded operator does not take an
# edit of its TTL for a new run. A field added to a trained block later goes here (tests/test_status_wire.py
# fails when one is missing).
_ADDED_LATER: dict[str, tuple[str, ...]] = {
    "": ("prompt_tuning", "prefix_tuning"),
    "output": ("interpolate", "select", "select_metric", "keep_mixes"),
    "distributed": ("min_nodes",),
}


# distributed.* fields that only place the gang's pods: an edit of them after the job finished is not a new run.
PLACEMENT_FIELDS: tuple[str, ...] = (
    "nodeLossTolerationSeconds",
    "spread",
    "networkCheck",
    "elasticWaitSeconds",
)


def _alias(model: BaseModel, name: str) -> str:
    return type(model).model_fields[name].alias or to_camel(
        name
    )  # no alias yet on fields rebuilt from forward refs


def _at_default(model: BaseModel, name: str) -> bool:
    return bool(getattr(model, name) == type(model).model_fields[name].get_default(call_default_factory=True))


def trained_hash(spec: FineTuneJobSpec) -> str:
    """Fingerprint of the fields that decide what is trained (resumeFrom only says how to start, publish
    where the result goes besides the output, card what the model card says)."""
    data = spec.model_dump(mode="json", by_alias=True, include=_TRAINED)
    for key in ("resumeFrom", "publish", "card"):
        data.get("output", {}).pop(key, None)
    for key in PLACEMENT_FIELDS:  # where the pods run, not what they train
        data.get("distributed", {}).pop(key, None)
    for block, names in _ADDED_LATER.items():
        model: BaseModel = getattr(spec, block) if block else spec
        where = data[_alias(spec, block)] if block else data
        for name in names:
            if _at_default(model, name):
                where.pop(_alias(model, name), None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_uri(base: str, run: int) -> str:
    """Run 1 writes to spec.output.uri itself; run n to `<uri>/run-<n>`."""
    return base if run <= 1 else f"{base.rstrip('/')}/run-{run}"


def for_run(spec: FineTuneJobSpec, status: FineTuneJobStatus) -> FineTuneJobSpec:
    """The spec as the current run trains it: its output at the run's own prefix."""
    if status.run <= 1:
        return spec
    return spec.model_copy(
        update={"output": spec.output.model_copy(update={"uri": run_uri(spec.output.uri, status.run)})}
    )


def needs_new_run(spec: FineTuneJobSpec, status: FineTuneJobStatus) -> bool:
    """Finished, and the spec now asks for something else to be trained."""
    recorded = status.trained_spec_hash
    return status.phase in TERMINAL and bool(recorded) and recorded != trained_hash(spec)


def start_new_run(
    spec: FineTuneJobSpec, generation: int | None, old: FineTuneJobStatus, now: datetime
) -> tuple[FineTuneJobStatus, tuple[str, str, str]]:
    """The status of run n+1 (Pending, no gang yet) with run n recorded, and its Event."""
    ts = iso(now)
    run = old.run
    record = RunRecord(
        run=run,
        generation=_run_generation(old),
        start_time=old.start_time,
        completion_time=old.completion_time,
        outcome="Succeeded" if old.phase == "Succeeded" else "Failed",
        message=old.message,
        uri=old.run_uri or run_uri(spec.output.uri, run),
        resumed_from=old.resumed_from,
        artifacts=old.artifacts,
    )
    nxt = run + 1
    resumed = (
        (old.run_uri or run_uri(spec.output.uri, run)) if spec.output.resume_from == "previous" else None
    )
    start = f"resuming from run {run}'s last checkpoint" if resumed else "training from the start"
    message = c.reason_message(
        NEW_RUN_REASON, run=nxt, generation=generation, start=start, uri=run_uri(spec.output.uri, nxt)
    )
    conds = list(old.conditions)
    for type_ in (c.SUCCEEDED, c.FAILED):
        if c.get_condition(conds, type_) is not None:
            conds = c.set_condition(conds, type_, False, NEW_RUN_REASON, message, ts, generation)
    conds = c.set_condition(conds, c.RUNNING, False, NEW_RUN_REASON, message, ts, generation)
    status = FineTuneJobStatus(
        phase="Pending",
        message=message,
        observed_generation=generation,
        restarts=0,
        run=nxt,
        run_uri=run_uri(spec.output.uri, nxt),
        trained_spec_hash=trained_hash(spec),
        run_generation=generation,
        conditions=conds,
        runs=[*old.runs, record],
        # Cleared for the new run (set to None: the merge patch removes them).
        start_time=None,
        completion_time=None,
        progress=None,
        artifacts=None,
        last_failure=None,
        last_checkpoint=None,
        resumed_from=resumed,
        tracking=None,
        # Usage goes on across runs (per run and in total); the idle time since the last run ended is not charged.
        usage=old.usage.model_copy(update={"updated_at": ts, "running_pods": 0}) if old.usage else None,
    )
    return status, ("Normal", NEW_RUN_REASON, message)


def _run_generation(status: FineTuneJobStatus) -> int | None:
    return status.run_generation if status.run_generation is not None else status.observed_generation
