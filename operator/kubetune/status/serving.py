"""The serving hand-off in status: `status.serving` and the Serving condition. Pure.

A succeeded job with spec.serving is handed off once: the operator creates the object, then records
it here; a job whose status already names the object it would create makes no API call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from kubetune.api.models import FineTuneJobStatus, ServingStatus
from kubetune.api.names import ANNOTATION_MODEL
from kubetune.status import conditions as c
from kubetune.status.derive import iso

Outcome = Literal["created", "missing", "refused", "taken"]
"""created: the object exists now and serves this job's model; missing: its API (the InferenceService
CRD) is not installed; refused: the API server rejected it; taken: an object of that name exists that
this job does not own (left alone)."""
RETRY_MISSING_SECONDS = 300.0
"""How often a job whose serving API is missing looks again (KServe may be installed later)."""


def serving_ref(obj: dict[str, Any]) -> ServingStatus:
    """status.serving for a rendered object: kind, name and the model URI it serves."""
    meta = obj["metadata"]
    return ServingStatus(
        kind=obj["kind"], name=meta["name"], uri=(meta.get("annotations") or {}).get(ANNOTATION_MODEL)
    )


def handed_off(status: FineTuneJobStatus, obj: dict[str, Any]) -> bool:
    """The status already records this very object as created: nothing to do."""
    cond = c.get_condition(status.conditions, c.SERVING)
    return status.serving == serving_ref(obj) and cond is not None and cond.status == "True"


def record(
    status: FineTuneJobStatus,
    obj: dict[str, Any],
    outcome: Outcome,
    now: datetime,
    generation: int | None,
    error: str = "",
) -> tuple[FineTuneJobStatus, tuple[str, str, str] | None]:
    """The status after a hand-off attempt, and its Event (None when the condition did not change)."""
    ref = serving_ref(obj)
    if outcome == "created":
        reason, ok = c.Reason.SERVING_CREATED, True
        message = c.reason_message(reason, kind=ref.kind, name=ref.name, uri=ref.uri)
    elif outcome == "missing":
        reason, ok = c.Reason.SERVING_API_MISSING, False
        message = c.reason_message(reason, kind=ref.kind, api=obj["apiVersion"], uri=ref.uri)
    elif outcome == "taken":
        reason, ok = c.Reason.SERVING_NAME_TAKEN, False
        message = c.reason_message(reason, kind=ref.kind, name=ref.name)
    else:
        reason, ok = c.Reason.SERVING_REFUSED, False
        message = c.reason_message(reason, kind=ref.kind, name=ref.name, error=error[:512])
    old = c.get_condition(status.conditions, c.SERVING)
    update: dict[str, Any] = {
        "conditions": c.set_condition(status.conditions, c.SERVING, ok, reason, message, iso(now), generation)
    }
    if ok:
        update["serving"] = ref
    changed = old is None or old.reason != reason or old.message != message
    return status.model_copy(update=update), (
        ("Normal" if ok else "Warning"),
        reason,
        message,
    ) if changed else None
