"""Hand a succeeded job's model to serving (spec.serving): create the InferenceService or Deployment,
owned by the FineTuneJob, and say so in status. Called by reconcile for a Succeeded job only: a failed
job (a failed evaluation gate included) creates nothing."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, cast

import kopf

from kubetune.api.models import FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.names import ANNOTATION_MODEL, LABEL_QUEUE
from kubetune.controller.cluster import ApiMissing, Cluster
from kubetune.render.serving import render_serving
from kubetune.status import serving as s

log = logging.getLogger("kubetune.serving")


def hand_off(
    body: dict[str, Any], spec: FineTuneJobSpec, status: FineTuneJobStatus, kube: Cluster
) -> tuple[FineTuneJobStatus, tuple[str, str, str] | None, float | None] | None:
    """(new status, Event, when to look again), or None when there is nothing to do."""
    if spec.serving is None or status.phase != "Succeeded":
        return None
    meta = body["metadata"]
    artifacts = status.artifacts.model_dump(by_alias=True, exclude_none=True) if status.artifacts else {}
    obj = render_serving(spec, meta["name"], meta["namespace"], artifacts)
    if s.handed_off(status, obj):
        return None
    kopf.adopt(obj, owner=cast(kopf.Body, body))  # owner reference, namespace, the owner's labels
    obj["metadata"]["labels"].pop(LABEL_QUEUE, None)  # a queue admits training, not the server
    now, generation = datetime.now(timezone.utc), meta.get("generation")
    where = f"{meta['namespace']}/{meta['name']}"
    try:
        created = kube.create_if_absent(obj)
    except ApiMissing:
        log.warning(
            "%s: no %s API; serving not created (looking again in %.0fs)",
            where,
            obj["apiVersion"],
            s.RETRY_MISSING_SECONDS,
        )
        new, event = s.record(status, obj, "missing", now, generation)
        return new, event, s.RETRY_MISSING_SECONDS
    except kopf.PermanentError as exc:
        log.error("%s: %s", where, exc)
        new, event = s.record(status, obj, "refused", now, generation, str(exc))
        return new, event, None
    if created is None:  # already there: this job's from an earlier run, or someone else's
        outcome, problem = update_existing(obj, meta.get("uid"), kube)
        if outcome != "created":
            new, event = s.record(status, obj, outcome, now, generation, problem)
            return new, event, None
    log.info(
        "%s: %s %s %s",
        where,
        obj["kind"],
        obj["metadata"]["name"],
        "created" if created else "there, serving this model",
    )
    new, event = s.record(status, obj, "created", now, generation)
    return new, event, None


def update_existing(obj: dict[str, Any], owner_uid: str | None, kube: Cluster) -> tuple[s.Outcome, str]:
    """Point an existing object of this job at the model it should serve now (a later run's); an object
    this job does not own is left alone. (outcome, what went wrong)."""
    existing = kube.read_serving(obj)
    if existing is None:
        raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} was deleted meanwhile", delay=1)
    meta = existing["metadata"]
    if not any(ref.get("uid") == owner_uid for ref in meta.get("ownerReferences") or []):
        return "taken", ""
    if (meta.get("annotations") or {}).get(ANNOTATION_MODEL) == obj["metadata"]["annotations"][
        ANNOTATION_MODEL
    ]:
        return "created", ""
    obj["metadata"]["resourceVersion"] = meta["resourceVersion"]
    try:
        kube.replace_serving(obj)
    except kopf.PermanentError as exc:
        return "refused", str(exc)
    return "created", ""
