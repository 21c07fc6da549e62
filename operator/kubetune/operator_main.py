"""The Kopf handlers: the only module with @kopf decorators. Each is a thin call into kubetune.controller.

Nothing here runs on a clock per object. Kopf watches FineTuneJobs and the Jobs and Pods that carry the
kubetune.io/job-name label (filtered by the API server); each event updates the controller's Store and
queues the FineTuneJob it concerns. No finalizer is added: children are owned (garbage-collected), and
nothing has to happen before a FineTuneJob goes.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.api.names import LABEL_JOB
from kubetune.controller import kube
from kubetune.controller.loop import Controller
from kubetune.controller.metrics import METRICS, counted_session, serve
from kubetune.controller.settings import Settings

RESOURCE = (GROUP, VERSION, PLURAL)
CHILD = {LABEL_JOB: kopf.PRESENT}
_state: dict[str, Any] = {}


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf keeps a diff base of each object for change handlers, deep-copying every event's body to build it.
    There are no change handlers here (only event handlers), and under a burst of 500 FineTuneJobs that copy
    took a fifth of the event loop (py-spy, bench/README.md). Nothing is stored: no annotation is written."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


def use(settings: Settings) -> Controller:
    """Set what the handlers below run with (before `kopf.operator()` starts). The client connects on its first
    call, after `configure` has loaded the kube config."""
    controller = Controller(settings, kube.KubeClient(qps=settings.api_qps, burst=settings.api_burst))
    _state["settings"], _state["controller"] = settings, controller
    return controller


def controller() -> Controller:
    if "controller" not in _state:
        use(Settings())
    return _state["controller"]  # type: ignore[no-any-return]


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """Kopf's own login (in-cluster, else kubeconfig) with a session whose requests, watch streams
    included, are counted in kubetune_api_requests_total like the operator's own."""
    info = kopf.login_via_client(**kwargs)
    return counted_session(info) if info is not None else None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    ours: Settings = controller().settings
    kube.load_config()
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = (
        False  # Events are ours (Cluster.post_event); Kopf would post one per handler log line
    )
    logging.getLogger("kopf.objects").setLevel(
        logging.WARNING
    )  # no "Handler 'pod_event' succeeded" per event
    # At rest (nothing changes) a watch stream carries nothing, not even a bookmark within 70 s (measured
    # with the apiserver's audit log), so Kopf's default 70 s inactivity timeout re-opened every stream every
    # 70 s (24 requests a minute for 4 kinds in 6 namespaces, measured: bench/README.md 3b).
    # Streams now last as long as the apiserver allows (no timeoutSeconds: --min-request-timeout x 1..2,
    # 30-60 min by default, spread at random), and a connection that died silently is found by TCP
    # keepalive (metrics.keepalive_socket, about a minute), not by a timeout on a quiet stream.
    settings.watching.server_timeout = None
    settings.watching.inactivity_timeout = 2 * 3600.0  # above any server-side watch timeout
    # Only our children come down the Job and Pod watches (a server-side label selector).
    settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_JOB
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_JOB
    settings.peering.standalone = not ours.peering
    if not ours.leader_elect:
        METRICS.leader.set(1)  # with leader election, kubetune.controller.leader sets it
    if ours.namespaces and not any(c in ns for ns in ours.namespaces for c in "*?!["):
        # Exact namespaces (the chart's watchNamespaces: a Role per namespace, no namespaces
        # list/watch): without this Kopf first tries to list namespaces, retries the 403 with
        # back-off for about a minute, and only then falls back to the given names.
        settings.scanning.disabled = True
    if ours.metrics_port:
        if serve(ours.metrics_port):
            logger.info("metrics on :%d/metrics", ours.metrics_port)
        else:
            logger.warning("metrics port %d is taken: no /metrics", ours.metrics_port)
    await controller().start()
    logger.info(
        "kubetune operator: image=%s poll=%ss progress budget=%s/s workers=%d api qps=%s",
        ours.trainer_image, ours.poll_interval, ours.progress_budget, ours.workers, ours.api_qps,
    )  # fmt: skip


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    await controller().stop()


@kopf.index(*RESOURCE)
async def finetunejobs_listed(body: kopf.Body, **_: Any) -> None:
    """Puts each FineTuneJob into the store before any handler runs. Kopf runs index handlers first, and holds
    every other handler, of every kind, until the initial listing of an indexed resource has gone through its
    index handlers. So the first reconcile after a start (or a new leader) sees every FineTuneJob: a job
    created on another's output just as the operator starts waits (OutputInUse) instead of being given a Job
    because the holder had not been listed yet. Nothing is kept in Kopf's index (None)."""
    controller().on_finetunejob_listed(dict(body))


@kopf.on.event(*RESOURCE)
async def finetunejob_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
    obj = dict(event["object"])
    METRICS.observe(type, obj)  # jobs by phase, restarts, per-job training gauges (from status.progress)
    controller().on_finetunejob(type, obj)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD)
async def job_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
    controller().on_child("Job", type, dict(event["object"]))


@kopf.on.event("", "v1", "pods", labels=CHILD)
async def pod_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
    controller().on_child("Pod", type, dict(event["object"]))


@kopf.on.event("kueue.x-k8s.io", "v1beta2", "workloads")
async def workload_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
    """Kueue's Workloads (only where Kueue is installed when the operator starts): why a queued gang waits, and
    when Kueue admits or evicts it. Those of other owners are dropped by the store (no owning Job of ours)."""
    controller().on_child("Workload", type, dict(event["object"]))
