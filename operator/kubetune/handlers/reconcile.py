"""What each handler does, as plain functions over the API wrappers in `kube` (no decorators here)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import kopf

from kubetune.api.models import FineTuneJobSpec
from kubetune.api.validation import SpecInvalid, parse_spec
from kubetune.handlers import kube
from kubetune.handlers.metrics import METRICS
from kubetune.handlers.settings import Settings
from kubetune.render.objects import COMPLETION_INDEX, render_all, render_workload, workload_name
from kubetune.status.derive import TERMINAL, Decision, Observed, derive, iso, refused_status, ttl_expired
from kubetune.status.progress import fetch_progress, to_progress


def now() -> datetime:
    return datetime.now(timezone.utc)


def accept(body: kopf.Body, status: dict[str, Any], logger: logging.Logger | Any) -> FineTuneJobSpec | None:
    """The typed spec, or None after marking a refused spec Failed (status, then an Event)."""
    meta = body["metadata"]
    try:
        return parse_spec(dict(body["spec"]), name=meta["name"])
    except SpecInvalid as exc:
        if status.get("phase") != "Failed":
            problems = [str(p) for p in exc.problems]
            kube.patch_status(meta["namespace"], meta["name"], refused_status(dict(status), problems, meta.get("generation"), now()))
            kopf.warn(body, reason="SpecInvalid", message="; ".join(problems))
            logger.warning("refused: %s", "; ".join(problems))
        return None


def ensure_children(body: kopf.Body, spec: FineTuneJobSpec, restarts: int, settings: Settings) -> list[str]:
    """Create-if-absent the ConfigMap, Service and current workload Job, owned by the FineTuneJob."""
    meta = body["metadata"]
    objs = render_all(
        spec, meta["name"], meta["namespace"], meta.get("uid", ""), restarts, dict(meta.get("labels") or {}), settings.trainer_image
    )
    created = []
    for obj in objs:
        kopf.adopt(obj, owner=body)
        if kube.create_if_absent(obj):
            created.append(f"{obj['kind']} {obj['metadata']['name']}")
            if obj["kind"] == "Job" and restarts == 0:
                METRICS.workload_created(dict(meta))
    return created


def on_create(body: kopf.Body, status: dict[str, Any], settings: Settings, logger: Any) -> None:
    if status.get("phase") in TERMINAL:
        return
    spec = accept(body, status, logger)
    if spec is None:
        return
    restarts = int(status.get("restarts") or 0)
    created = ensure_children(body, spec, restarts, settings)
    if created:
        logger.info("created %s", ", ".join(created))
    if not status.get("phase"):
        meta = body["metadata"]
        publish(body, derive(spec, meta["name"], meta.get("generation"), dict(status), Observed(job=None), now()))


def publish(body: kopf.Body, decision: Decision) -> None:
    """Write the decided status, then record its Event (status first: the Event describes it)."""
    meta = body["metadata"]
    kube.patch_status(meta["namespace"], meta["name"], decision.status)
    if decision.event:
        kopf.event(body, type=decision.event[0], reason=decision.event[1], message=decision.event[2])


def observe(namespace: str, name: str, restarts: int, settings: Settings) -> Observed:
    current = workload_name(name, restarts)
    gen = str(restarts)
    jobs = kube.list_jobs(namespace, name)
    job = next((j for j in jobs if j["metadata"]["name"] == current and not j["metadata"].get("deletionTimestamp")), None)
    pods = kube.list_pods(namespace, name)
    mine = [p for p in pods if kube.generation_of(p) == gen]
    stale = sum(1 for j in jobs if j["metadata"]["name"] != current) + sum(1 for p in pods if kube.generation_of(p) != gen)
    if job is None and any(j["metadata"]["name"] == current for j in jobs):
        stale += 1  # the current one is being deleted
    progress = None
    rank0 = next(
        (
            p
            for p in mine
            if (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX) == "0"
            and (p.get("status") or {}).get("phase") == "Running"
            and (p.get("status") or {}).get("podIP")
        ),
        None,
    )
    if rank0 is not None:
        data = fetch_progress(rank0["status"]["podIP"], timeout=settings.progress_timeout)
        if data is not None:
            progress = to_progress(data, iso(now()))
    return Observed(job=job, pods=mine, stale=stale, progress=progress)


def act(body: kopf.Body, spec: FineTuneJobSpec, decision: Decision, settings: Settings, logger: Any) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    restarts = int(decision.status.get("restarts") or 0)
    if decision.action == "create":
        created = ensure_children(body, spec, restarts, settings)
        if created:
            logger.info("created %s", ", ".join(created))
    elif decision.action == "restart":
        old = workload_name(name, restarts - 1)
        logger.warning("gang restart %d: deleting %s", restarts, old)
        kube.delete_job(ns, old, propagation="Foreground")
    elif decision.action == "stop":
        job = kube.get_job(ns, workload_name(name, restarts))
        conds = {c.get("type") for c in ((job or {}).get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
        if job is not None and not conds & {"Failed", "Complete"}:
            kube.delete_job(ns, workload_name(name, restarts), propagation="Background")


def _delete_quietly(ns: str, name: str, logger: Any) -> None:
    try:
        kube.delete_finetunejob(ns, name)
    except Exception as exc:  # noqa: BLE001 - the next poll retries
        logger.warning("TTL delete of %s/%s failed: %s", ns, name, exc)


def on_timer(body: kopf.Body, status: dict[str, Any], settings: Settings, logger: Any) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if status.get("phase") in TERMINAL:
        try:
            spec = FineTuneJobSpec.model_validate(dict(body["spec"]))
        except ValueError:
            return
        if ttl_expired(spec, dict(status), now()):
            logger.info("ttlSecondsAfterFinished passed: deleting")
            _delete_quietly(ns, name, logger)  # a failed delete is retried by the next poll
        return
    parsed = accept(body, status, logger)
    if parsed is None:
        return
    restarts = int(status.get("restarts") or 0)
    observed = observe(ns, name, restarts, settings)
    decision = derive(parsed, name, meta.get("generation"), dict(status), observed, now())
    publish(body, decision)  # status and Event first, then the action
    act(body, parsed, decision, settings, logger)


def on_suspend_change(body: kopf.Body, new: Any, status: dict[str, Any], logger: Any) -> None:
    """spec.runPolicy.suspend changed: suspend or resume the current workload Job."""
    meta = body["metadata"]
    if status.get("phase") in TERMINAL:
        return
    name = workload_name(meta["name"], int(status.get("restarts") or 0))
    if kube.set_job_suspend(meta["namespace"], name, bool(new)):
        logger.info("%s Job %s", "suspended" if new else "resumed", name)


def render_for(body: kopf.Body, spec: FineTuneJobSpec, restarts: int, settings: Settings) -> dict[str, Any]:
    meta = body["metadata"]
    return render_workload(spec, meta["name"], meta["namespace"], restarts, dict(meta.get("labels") or {}), settings.trainer_image)
