"""The Kopf handlers: the only module with @kopf decorators. Each is a thin call into kubetune.handlers."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.handlers import kube, reconcile
from kubetune.handlers.metrics import METRICS, serve
from kubetune.handlers.settings import Settings

SETTINGS = Settings.from_env()  # read at import: the timer's interval is fixed at decoration time
RESOURCE = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    kube.load_config()
    # Progress and diff-base annotations under our own prefix; nothing written to spec.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    # Deleting a FineTuneJob waits for its status timer to stop before Kopf removes its finalizer.
    # A timer caught mid-poll does not stop "instantly", and Kopf then looks again only after
    # cancellation_polling (60 s by default): `kubectl delete ftj` took a minute. Look every second.
    settings.background.instant_exit_timeout = 0.1
    settings.background.cancellation_polling = 1.0
    settings.peering.standalone = not SETTINGS.peering
    if SETTINGS.namespaces and not any(c in ns for ns in SETTINGS.namespaces for c in "*?!["):
        # Exact namespaces (the chart's watchNamespaces: a Role per namespace, no namespaces
        # list/watch): without this Kopf first tries to list namespaces, retries the 403 with
        # back-off for about a minute, and only then falls back to the given names.
        settings.scanning.disabled = True
    logger.info("kubetune operator: image=%s poll=%ss", SETTINGS.trainer_image, SETTINGS.poll_interval)
    if SETTINGS.metrics_port:
        if serve(SETTINGS.metrics_port):
            logger.info("metrics on :%d/metrics", SETTINGS.metrics_port)
        else:
            logger.warning("metrics port %d is taken: no /metrics", SETTINGS.metrics_port)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
def create(body: kopf.Body, status: kopf.Status, logger: kopf.Logger, **_: Any) -> None:
    with METRICS.reconciling("create"):
        reconcile.on_create(body, dict(status), SETTINGS, logger)


@kopf.timer(*RESOURCE, interval=SETTINGS.poll_interval, initial_delay=1.0, sharp=False)
def poll(body: kopf.Body, status: kopf.Status, logger: kopf.Logger, **_: Any) -> None:
    with METRICS.reconciling("poll"):
        reconcile.on_timer(body, dict(status), SETTINGS, logger)


@kopf.on.field(*RESOURCE, field="spec.runPolicy.suspend")
def suspend(body: kopf.Body, new: Any, status: kopf.Status, logger: kopf.Logger, **_: Any) -> None:
    with METRICS.reconciling("suspend"):
        reconcile.on_suspend_change(body, new, dict(status), logger)


@kopf.on.event(*RESOURCE)
def observe(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Every watch event: jobs by phase, restarts, and the per-job training metrics (from status.progress)."""
    METRICS.observe(event.get("type"), dict(body))
