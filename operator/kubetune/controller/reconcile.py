"""Reconcile one FineTuneJob: read what the watches saw (the Store), decide (pure `derive`), write the
status only when it changed, record the Event, then act. Runs in a worker thread; no decorators here.

`reconcile()` returns when to look again (seconds) for what no watch event announces: a deadline,
a TTL, a trainer that never answers; None when only a change should wake it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, cast

import kopf
import yaml

from kubetune.api.models import FineTuneJobSpec, FineTuneJobStatus, Progress
from kubetune.api.names import (
    ANNOTATION_DEFERRED,
    ANNOTATION_RELEASED,
    ANNOTATION_SUSPEND_APPLIED,
    COMPLETION_INDEX,
    GANG_GATE,
    JOB_UID_LABEL,
    LABEL_RESTART,
    workload_name,
)
from kubetune.api.schedulers import FLAVORS
from kubetune.api.trainer_config import TrainerConfig
from kubetune.api.validation import SpecInvalid, parse_spec
from kubetune.controller import checkpoints, serving
from kubetune.controller.cluster import ApiMissing, Cluster
from kubetune.controller.metrics import METRICS
from kubetune.controller.settings import Settings
from kubetune.controller.store import Key, Store
from kubetune.render.gang import gang_of
from kubetune.render.objects import render_config_map, render_pod_group_for, render_service, render_workload
from kubetune.status import elastic, outputs, runs
from kubetune.status.conditions import Reason
from kubetune.status.derive import (
    PROGRESS_GRACE_SECONDS,
    TERMINAL,
    Decision,
    Observed,
    derive,
    in_place,
    iso,
    job_stuck,
    lost_node,
    placement_deadline,
    pod_group_missing,
    refused_status,
    ttl_expired,
)

log = logging.getLogger("kubetune.reconcile")
CHILD_KINDS = ("Job", "ConfigMap", "Service")


STALE_RECHECK_SECONDS = 30.0
CRD_RECHECK_SECONDS = 30.0
"""How often a job whose gang scheduler's PodGroup CRD is missing looks again (CRDs are not watched)."""


def now() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------ pure parts


def observe(
    name: str,
    restarts: int,
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    progress: tuple[str, Progress] | None,
) -> Observed:
    """The run's Job; the pods of the current gang generation (labelled with it when the operator released
    them); the Job's pods still behind the gang gate (the next generation, waiting to be released); how many
    objects that hold up a release remain (pods of earlier generations still running or terminating, pods being
    deleted, other Jobs); and rank 0's progress if it is this gang's (a read from an earlier gang is not shown)."""
    gen = str(restarts)
    live = [j for j in jobs if not j["metadata"].get("deletionTimestamp")]
    live.sort(
        key=lambda j: j["metadata"]["name"] != workload_name(name)
    )  # an older operator's `-r<n>` Job too
    job = live[0] if live else None
    uid = (job or {}).get("metadata", {}).get("uid")
    stale = len(jobs) - (1 if job is not None else 0)
    mine: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    for p in pods:
        meta = p["metadata"]
        labels = meta.get("labels") or {}
        owner = labels.get(JOB_UID_LABEL)  # the Job controller's label: tells two Jobs of the same name apart
        label = labels.get(LABEL_RESTART)
        of_job = job is not None and (owner == uid if owner else label == gen)
        deleting = bool(meta.get("deletionTimestamp"))
        done = (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if of_job and label == gen:
            mine.append(p)
            stale += (
                deleting and lost_node(p) is None
            )  # e.g. suspended: the next pods wait until these are gone
        elif of_job and label is None and not deleting and not done:
            waiting.append(p)
        elif (deleting or not done) and lost_node(
            p
        ) is None:  # an earlier generation's pod still running, or going
            stale += 1  # (a pod lost with its node is never finished by its kubelet: nothing waits for it)
        # else: a finished pod of an earlier generation, kept (its logs) until the Job goes
    shown = None
    if progress is not None and any(p["metadata"]["name"] == progress[0] for p in mine):
        shown = progress[1]
    return Observed(job=job, pods=mine, stale=stale, progress=shown, waiting=waiting, all_pods=pods)


def wake_after(
    spec: FineTuneJobSpec, status: FineTuneJobStatus, observed: Observed, at: datetime, poll: float
) -> float | None:
    """Seconds until something changes that no watch event reports; None if nothing will."""
    phase = status.phase
    waits: list[float] = []
    if phase in TERMINAL:
        ttl, done = spec.run_policy.ttl_seconds_after_finished, elastic.parse_time(status.completion_time)
        if ttl is not None and done is not None:
            waits.append(ttl - (at - done).total_seconds())
        return max(0.5, min(waits)) if waits else None
    deadline, start = spec.run_policy.active_deadline_seconds, elastic.parse_time(status.start_time)
    if deadline and start is not None:
        waits.append(deadline - (at - start).total_seconds() + 0.5)
    if phase == "Initializing" and observed.progress is None:
        waits.append(min(poll, PROGRESS_GRACE_SECONDS))  # the grace for a trainer that never answers
    if (elastic_wait := elastic.wake_in(spec, observed.pods, at)) is not None:
        waits.append(elastic_wait)  # an unplaced pod's wait ends: the gang may restart on fewer nodes
    placed_by = placement_deadline(spec, observed.pods) if phase in ("Pending", "Initializing") else None
    if (
        placed_by is not None and placed_by > at
    ):  # spec.scheduling.gang.scheduleTimeoutSeconds: Unschedulable then
        waits.append((placed_by - at).total_seconds() + 0.5)
    if observed.stale:
        waits.append(
            STALE_RECHECK_SECONDS
        )  # the watch reports the old gang gone; this only guards a lost event
    return max(0.5, min(waits)) if waits else None


def status_changed(old: dict[str, Any], patch: dict[str, Any]) -> bool:
    """Whether writing `patch` (the whole status, or the fields a new run sets) changes the stored status."""
    return {k: v for k, v in old.items() if k != "kopf"} != {k: v for k, v in patch.items() if k != "kopf"}


# ------------------------------------------------------------------ the loop body


def reconcile(key: Key, store: Store, settings: Settings, kube: Cluster) -> float | None:
    body = store.ftj(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    meta = body["metadata"]
    ns, name = key
    status = FineTuneJobStatus.from_stored(body.get("status"))
    if status.phase in TERMINAL:
        return finished(key, body, status, store, kube)
    spec = accept(body, status, store, kube)
    if spec is None:
        return None
    if not status.trained_spec_hash:  # the first pass of a run: remember what it trains
        status = status.model_copy(update={"trained_spec_hash": runs.trained_hash(spec), "run_generation": meta.get("generation"),
                                           "run_uri": runs.run_uri(spec.output.uri, status.run)})  # fmt: skip
    spec = runs.for_run(spec, status)
    restarts = status.restarts
    jobs, pods = store.children(key)
    seen = store.seen_progress(key)
    observed = observe(name, restarts, jobs, pods, (seen.pod, seen.progress) if seen else None)
    at = now()
    observed = replace(observed, workload=store.workload_of(key, observed.job),
                       resumed_seen=store.resume_seen(observed.job, at))  # fmt: skip
    decision = derive(spec, name, meta.get("generation"), status, observed, at, settings.prices)
    if decision.action == "create":
        others = [other for k in store.keys() if k != key and (other := store.ftj(k)) is not None]
        if (
            holding := outputs.holder(body, others)
        ) is not None:  # another live job writes there: wait for it
            waiting = outputs.waiting_status(
                status, body, holding, meta.get("generation"), at, spec.run_policy.suspend
            )
            told = any(cond.reason == Reason.OUTPUT_IN_USE for cond in status.conditions)
            publish(
                body,
                Decision(
                    status=waiting,
                    event=None if told else ("Warning", str(Reason.OUTPUT_IN_USE), waiting.message or ""),
                ),
                store,
                kube,
            )
            return outputs.OUTPUT_RECHECK_SECONDS
        if (
            missing := ensure_pod_group(body, spec, kube)
        ) is not None:  # no Job until its gang's PodGroup can exist
            publish(
                body,
                Decision(**pod_group_missing(status, missing, spec, meta.get("generation"), at)),
                store,
                kube,
            )
            return CRD_RECHECK_SECONDS
        # Creating is idempotent, so it goes first here: the status then describes the Job just created
        # (one status write and one Event for a new job instead of Pending, then Suspended or Initializing).
        act(body, spec, decision, observed, store, settings, kube)
        jobs, pods = store.children(key)
        observed = observe(name, restarts, jobs, pods, None)
        observed = replace(observed, workload=store.workload_of(key, observed.job),
                           resumed_seen=store.resume_seen(observed.job, at))  # fmt: skip
        decision = derive(spec, name, meta.get("generation"), status, observed, at, settings.prices)
        decision = Decision(status=decision.status, event=decision.event)  # created already
    # Before any eviction: ask rank 0 for a checkpoint, keep status.lastCheckpoint current, and hold the
    # operator's own suspend until the checkpoint is written (controller/checkpoints.py).
    plan = checkpoints.plan(key, spec, decision.status, observed, store, kube, decision.action == "none")
    decision = replace(decision, status=plan.status)
    publish(body, decision, store, kube)  # status and Event first, then the action
    if not (plan.hold and decision.action == "none"):
        act(body, spec, decision, observed, store, settings, kube)
    wake = sooner(wake_after(spec, decision.status, observed, at, settings.poll_interval), plan.wake)
    return sooner(wake, serve(body, spec, decision.status, store, kube))


def finished(
    key: Key, body: dict[str, Any], status: FineTuneJobStatus, store: Store, kube: Cluster
) -> float | None:
    """A finished job: start a new run when its trained fields were edited, keep observedGeneration
    truthful, and delete it when its TTL has passed."""
    meta = body["metadata"]
    generation = meta.get("generation")
    if status.observed_generation != generation:
        spec = accept(body, status, store, kube)
        if spec is None:
            return None
        if runs.needs_new_run(spec, status):
            return new_run(key, body, spec, status, store, kube)
        if status.trained_spec_hash:  # the edit changed nothing trained: the status still describes it
            publish(
                body,
                Decision(status=status.model_copy(update={"observed_generation": generation})),
                store,
                kube,
            )
            status = status.model_copy(update={"observed_generation": generation})
    try:
        spec = FineTuneJobSpec.model_validate(dict(body["spec"]))
    except ValueError:
        return None
    at = now()
    if ttl_expired(spec, status, at):
        log.info("%s/%s: ttlSecondsAfterFinished passed: deleting", meta["namespace"], meta["name"])
        kube.delete_finetunejob(meta["namespace"], meta["name"])
        return None
    return sooner(wake_after(spec, status, Observed(job=None), at, 0), serve(body, spec, status, store, kube))


def serve(
    body: dict[str, Any], spec: FineTuneJobSpec, status: FineTuneJobStatus, store: Store, kube: Cluster
) -> float | None:
    """A succeeded job with spec.serving: create what serves it once, then record it (status, Event)."""
    done = serving.hand_off(body, spec, status, kube)
    if done is None:
        return None
    new_status, event, wake = done
    publish(body, Decision(status=new_status, event=event), store, kube)
    return wake


def sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def new_run(
    key: Key,
    body: dict[str, Any],
    spec: FineTuneJobSpec,
    status: FineTuneJobStatus,
    store: Store,
    kube: Cluster,
) -> float | None:
    """Close the finished run, remove its gang (the next run reuses the workload names), start run n+1."""
    meta = body["metadata"]
    new_status, event = runs.start_new_run(spec, meta.get("generation"), status, now())
    jobs, _ = store.children(key)
    for job in jobs:  # the new gang waits until the watch shows these Jobs and their pods gone
        left = kube.delete_job(meta["namespace"], job["metadata"]["name"], propagation="Background")
        if left is not None:
            store.put_child("Job", left)
        else:
            store.drop_child("Job", job)
    store.progress.pop(key, None)
    publish(body, Decision(status=new_status, event=event), store, kube)
    log.info("%s/%s: %s", meta["namespace"], meta["name"], event[2])
    return None


def accept(
    body: dict[str, Any], status: FineTuneJobStatus, store: Store, kube: Cluster
) -> FineTuneJobSpec | None:
    """The typed spec, or None after marking a refused spec Failed (status, then an Event)."""
    meta = body["metadata"]
    try:
        return parse_spec(dict(body["spec"]), name=meta["name"])
    except SpecInvalid as exc:
        if status.phase != "Failed":
            problems = "; ".join(str(p) for p in exc.problems)
            refused = refused_status(status, [str(p) for p in exc.problems], meta.get("generation"), now())
            publish(
                body, Decision(status=refused, event=("Warning", Reason.SPEC_INVALID, problems)), store, kube
            )
            log.warning("%s/%s refused: %s", meta["namespace"], meta["name"], problems)
        return None


def publish(body: dict[str, Any], decision: Decision, store: Store, kube: Cluster) -> None:
    """Write the decided status if it differs from the stored one (body's), then record its Event."""
    meta = body["metadata"]
    patch = decision.status.to_patch()  # the one place a status is serialised
    if status_changed(dict(body.get("status") or {}), patch):
        written = kube.patch_status(meta["namespace"], meta["name"], patch)
        if written is not None:
            store.put_ftj(written)  # the next pass starts from this, even before the watch echoes it
    if decision.event:
        kube.post_event(body, *decision.event)


def ensure_children(
    body: dict[str, Any],
    spec: FineTuneJobSpec,
    restarts: int,
    store: Store,
    settings: Settings,
    kube: Cluster,
    kinds: tuple[str, ...] = CHILD_KINDS,
) -> list[str]:
    """Create-if-absent the workload Job first (what a queue admits and a user waits for), then its
    ConfigMap and Service, all owned by the FineTuneJob. A Job created suspended goes alone: its
    ConfigMap and Service wait for its admission (`ANNOTATION_DEFERRED`, `admit`)."""
    meta = body["metadata"]
    deferred: tuple[str, ...] = ()
    if "Job" in kinds and spec.run_policy.suspend:
        deferred, kinds = tuple(k for k in kinds if k != "Job"), ("Job",)
    status = FineTuneJobStatus.from_stored(body.get("status"))
    nodes = elastic.gang_nodes(
        spec, status.gang_nodes
    )  # fewer than spec.distributed.nodes after an elastic shrink
    render = {
        "ConfigMap": lambda: render_config_map(
            spec, meta["name"], meta["namespace"], meta.get("uid", ""), status.run, nodes
        ),
        "Service": lambda: render_service(meta["name"], meta["namespace"]),
        "Job": lambda: render_workload(
            gang_spec(spec, nodes),
            meta["name"],
            meta["namespace"],
            dict(meta.get("labels") or {}),
            settings.trainer_image,
        ),
    }  # only what is created now: the trainer config's YAML was a tenth of the operator's time under a burst
    objs = [render[kind]() for kind in kinds]
    objs.sort(key=lambda o: o["kind"] != "Job")
    later_run = status.run > 1
    created = []
    for obj in objs:
        kopf.adopt(obj, owner=cast(kopf.Body, body))  # owner reference, namespace, the owner's labels
        if obj["kind"] == "Job":
            annotations = obj["metadata"].setdefault("annotations", {})
            annotations[ANNOTATION_SUSPEND_APPLIED] = str(spec.run_policy.suspend).lower()
            if deferred:
                annotations[ANNOTATION_DEFERRED] = ",".join(deferred)
        if obj["kind"] == "ConfigMap" and status.resumed_from:
            resumed = status.resumed_from
            obj["data"] = {k: with_resume_from(v, resumed) for k, v in obj["data"].items()}
        done = kube.create_if_absent(obj)
        if done is not None:
            created.append(f"{obj['kind']} {obj['metadata']['name']}")
            if obj["kind"] == "Job":
                store.put_child("Job", done)
                if restarts == 0:
                    METRICS.workload_created(dict(meta))
        elif obj["kind"] == "ConfigMap" and (later_run or spec.distributed.elastic):
            # the previous run's config, or an elastic gang's of another size: this gang's replaces it
            kube.patch_config_map(meta["namespace"], obj["metadata"]["name"], {"data": obj["data"]})
    return created


def gang_spec(spec: FineTuneJobSpec, nodes: int) -> FineTuneJobSpec:
    """The spec the workload Job of a gang of `nodes` nodes is rendered from (its pods, torchrun's --nnodes, the
    spread); the trainer config keeps the job's own spec (what a checkpoint records as trained)."""
    if nodes == spec.distributed.nodes:
        return spec
    return spec.model_copy(update={"distributed": spec.distributed.model_copy(update={"nodes": nodes})})


def ensure_pod_group(body: dict[str, Any], spec: FineTuneJobSpec, kube: Cluster) -> str | None:
    """Create-if-absent the gang scheduler's PodGroup (spec.scheduling.gang), owned by the FineTuneJob; the name
    of its CRD when the cluster does not serve it, else None."""
    meta = body["metadata"]
    group = render_pod_group_for(spec, meta["name"], meta["namespace"])
    if group is None:
        return None
    kopf.adopt(group, owner=cast(kopf.Body, body))
    try:
        if kube.create_if_absent(group) is not None:
            log.info(
                "%s/%s: created PodGroup %s (%s)",
                meta["namespace"],
                meta["name"],
                meta["name"],
                group["apiVersion"],
            )
    except ApiMissing:
        gang = gang_of(spec)
        assert gang is not None
        return FLAVORS[gang.scheduler].crd
    return None


def with_resume_from(config_yaml: str, uri: str) -> str:
    config = TrainerConfig.model_validate(yaml.safe_load(config_yaml))
    return config.model_copy(update={"resume_from": uri}).dump_yaml()


def act(
    body: dict[str, Any],
    spec: FineTuneJobSpec,
    decision: Decision,
    observed: Observed,
    store: Store,
    settings: Settings,
    kube: Cluster,
) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    restarts = decision.status.restarts
    job = observed.job
    gang_nodes = elastic.gang_nodes(spec, decision.status.gang_nodes)  # an elastic gang's next size
    if decision.action == "create":
        created = ensure_children(body, spec, restarts, store, settings, kube)
        if created:
            log.info("%s/%s: created %s", ns, name, ", ".join(created))
    elif decision.action == "restart" and job is not None and in_place(job, observed.pods, gang_nodes):
        restart_in_place(ns, name, restarts, observed, store, kube)
    elif decision.action == "recreate" and job is not None:
        log.warning("%s/%s: the Job controller does not update Job %s (%s): replacing the Job", ns, name,
                    job["metadata"]["name"], job_stuck(job, observed.all_pods, now(), observed.resumed_seen))  # fmt: skip
        left = kube.delete_job(ns, job["metadata"]["name"], propagation="Background")
        if left is not None:
            store.put_child("Job", left)
    elif decision.action == "restart" and job is not None:
        # The Job has failed, finished an index, or has another size than the next gang (elastic): it cannot run
        # the gang again. A new Job (a new Kueue Workload, queued again) is created once this one's pods are gone.
        log.warning("%s/%s: gang restart %d: Job %s cannot run it again: deleting it", ns, name, restarts,
                    job["metadata"]["name"])  # fmt: skip
        if elastic.waiting(observed.pods):
            # A pod of this gang never found a node (the shrink's cause): the gang never formed, its other ranks
            # wait in torchrun's rendezvous with nothing to save; stopped at once, not after their grace period
            # (torchrun, the container's first process, has no SIGTERM handler before its workers start).
            stop_at_once(ns, name, observed, store, kube, "their gang never formed")
        # Background: the Job goes at once and the garbage collector removes its pods.
        left = kube.delete_job(ns, job["metadata"]["name"], propagation="Background")
        if left is not None:
            store.put_child("Job", left)
    elif decision.action == "stop":
        conds = {
            c.get("type")
            for c in ((job or {}).get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        if job is not None and not conds & {"Failed", "Complete"}:
            kube.delete_job(ns, job["metadata"]["name"], propagation="Background")
    elif job is not None and decision.status.phase not in TERMINAL:
        admit(
            body, job, spec, restarts, store, settings, kube
        )  # the config and DNS before any pod is released
        if decision.action == "release":
            release(ns, name, restarts, observed, store, kube)


def restart_in_place(
    ns: str, name: str, restarts: int, observed: Observed, store: Store, kube: Cluster
) -> None:
    """Delete the failed generation's pods that still run (gracefully: they checkpoint on SIGTERM; at once when a
    rank was lost with its node, as its peers cannot checkpoint without it), and mark those
    lost with their node Failed (their kubelet will never finish them; the Job controller replaces a pod only
    once it has stopped). The Job stays, and with it the queue's admission; the Job controller replaces every pod
    behind the gang gate, and the operator releases the new generation once the old one is gone."""
    lost = [
        p
        for p in observed.pods
        if lost_node(p) is not None and (p.get("status") or {}).get("phase") != "Failed"
    ]
    going = [
        p for p in observed.pods
        if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]  # fmt: skip
    log.warning("%s/%s: gang restart %d in place: deleting %d running pod(s) of generation %d%s", ns, name, restarts,
                len(going), restarts - 1, f", {len(lost)} lost with their node marked Failed" if lost else "")  # fmt: skip
    for pod in lost:
        done = kube.fail_pod(
            ns, pod["metadata"]["name"], Reason.NODE_LOST, f"lost with node {lost_node(pod)}"
        )
        if done is not None:
            store.put_child("Pod", done)
    # A rank lost with its node leaves its peers hung in a collective with it: they cannot checkpoint (a
    # checkpoint needs every rank) and would only wait out their grace period; the gang resumes from the newest
    # complete checkpoint, so they are stopped at once. Otherwise each pod gets its grace period to checkpoint.
    delete_pods(ns, going, store, kube, AT_ONCE if lost else None)


AT_ONCE = 1
"""The grace period of a pod with nothing to save: 1 s, not 0 (which removes the object before its kubelet has
stopped it: a pod gone from the API server would no longer mean a process gone from its node)."""


def stop_at_once(ns: str, name: str, observed: Observed, store: Store, kube: Cluster, why: str) -> None:
    """Delete the gang's live pods with a grace period of AT_ONCE (they have nothing to checkpoint: `why`)."""
    going = [
        p for p in observed.pods
        if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") in ("Pending", "Running")
    ]  # fmt: skip
    if going:
        log.info("%s/%s: stopping %d pod(s) at once: %s", ns, name, len(going), why)
    delete_pods(ns, going, store, kube, AT_ONCE)


def delete_pods(ns: str, pods: list[dict[str, Any]], store: Store, kube: Cluster, grace: int | None) -> None:
    """Delete `pods` (with `grace` seconds, or each pod's own grace period) and keep what the deletes left."""
    for pod in pods:
        left = kube.delete_pod(ns, pod["metadata"]["name"], grace_seconds=grace)
        if left is not None:
            store.put_child("Pod", left)


def release(ns: str, name: str, restarts: int, observed: Observed, store: Store, kube: Cluster) -> None:
    """Start gang generation `restarts`: label each waiting pod with it and lift its gang gate."""
    at = iso(now())
    pods = sorted(
        observed.waiting,
        key=lambda p: int((p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX) or 0),
    )
    for pod in pods:
        done = kube.release_pod(ns, pod["metadata"]["name"], GANG_GATE, {LABEL_RESTART: str(restarts)},
                                {ANNOTATION_RELEASED: at})  # fmt: skip
        if done is not None:
            store.put_child("Pod", done)
    log.info("%s/%s: released gang generation %d (%d pod(s))", ns, name, restarts, len(pods))


def admit(
    body: dict[str, Any],
    job: dict[str, Any],
    spec: FineTuneJobSpec,
    restarts: int,
    store: Store,
    settings: Settings,
    kube: Cluster,
) -> None:
    """Keep the Job's suspension as the spec says, and create the children a suspended Job was created
    without once it is admitted: before the operator resumes it, or right after a queue (Kueue) has."""
    meta = job["metadata"]
    annotations = meta.get("annotations") or {}
    want = str(spec.run_policy.suspend).lower()
    applied = annotations.get(ANNOTATION_SUSPEND_APPLIED)
    resume = not (
        applied == want or (applied is None and bool(job["spec"].get("suspend")) == spec.run_policy.suspend)
    )
    deferred = tuple(k for k in (annotations.get(ANNOTATION_DEFERRED) or "").split(",") if k)
    admitted = not spec.run_policy.suspend if resume else not job["spec"].get("suspend")
    patch: dict[str, Any] = {}
    if deferred and admitted:
        created = ensure_children(body, spec, restarts, store, settings, kube, kinds=deferred)
        log.info(
            "%s/%s: admitted: created %s",
            meta["namespace"],
            meta["name"],
            ", ".join(created) or "nothing new",
        )
        patch = {"metadata": {"annotations": {ANNOTATION_DEFERRED: None}}}
    if resume:
        patch = {"metadata": {"annotations": {**patch.get("metadata", {}).get("annotations", {}), ANNOTATION_SUSPEND_APPLIED: want}},
                 "spec": {"suspend": spec.run_policy.suspend}}  # fmt: skip
    if not patch:
        return
    patched = kube.patch_job(meta["namespace"], meta["name"], patch)
    if patched is not None:
        store.put_child("Job", patched)
        if resume:
            log.info(
                "%s/%s: %s Job %s",
                meta["namespace"],
                meta["name"],
                "suspended" if spec.run_policy.suspend else "resumed",
                meta["name"],
            )
