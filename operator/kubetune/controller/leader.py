"""Leader election over a coordination.k8s.io Lease: several operator replicas run, exactly one reconciles.

client-go's algorithm (k8s.io/client-go/tools/leaderelection), in a thread of its own so that a busy event
loop never delays a renewal:

- a candidate takes the Lease when it is absent, has no holder, or has not changed for its
  leaseDurationSeconds, timed on the candidate's own clock from when it saw the last change (clock skew
  between replicas does not matter);
- every write is a replace guarded by resourceVersion: of two candidates writing at once, one gets 409 and
  stays a standby;
- the leader renews every retry period. When it cannot renew within the renew deadline (shorter than the
  lease duration), or finds another holder, it exits at once: it has stopped before a standby may start;
- a leader that stops gracefully (SIGTERM, a rolling update) releases the Lease, and a standby takes over
  within one retry period instead of a lease duration.

A standby runs no Kopf and no watches: it answers the liveness probe and serves /metrics (kubetune_leader 0).
The new leader starts Kopf, whose watches list every FineTuneJob, Job and Pod, and reconciles them all;
creating children is idempotent (fixed names, 409 means "already there"), so what the old leader left half
done is finished, never duplicated.

Not kubernetes.leaderelection: the pinned client (36) has only a ConfigMap lock, its LeaseLock came in 37
(which needs a newer pydantic than ours), and it cannot release the lease on shutdown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.api.names import APP_OPERATOR, standard_labels
from kubetune.controller.metrics import METRICS, counting_client
from kubetune.controller.settings import Settings

log = logging.getLogger("kubetune.leader")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOST_LEASE_EXIT = 75
"""Exit status of a leader that lost its lease (EX_TEMPFAIL): the Deployment restarts it as a standby."""


class Outcome(Enum):
    LEADING = "leading"
    HELD = "held by another replica"
    ERROR = "API error"


# ------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says about its holder (spec), and its resourceVersion."""

    holder: str | None
    duration: float | None
    acquired: str | None
    renewed: str | None
    transitions: int
    version: str | None

    @classmethod
    def of(cls, lease: dict[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or None,
            duration=spec.get("leaseDurationSeconds"),
            acquired=spec.get("acquireTime"),
            renewed=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            version=(lease.get("metadata") or {}).get("resourceVersion"),
        )


def may_take(record: LeaseRecord | None, me: str, observed_at: float, now: float, duration: float) -> bool:
    """Whether `me` may write the Lease now: it is absent, free, ours, or unchanged for its duration since
    `observed_at` (this process's monotonic clock when it last saw the record change)."""
    if record is None or record.holder is None or record.holder == me:
        return True
    return now >= observed_at + (record.duration or duration)


def micro_time(at: datetime) -> str:
    """A metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claim(record: LeaseRecord | None, me: str, duration: float, at: datetime) -> dict[str, Any]:
    """The Lease spec `me` writes to take or renew it. A renewal keeps the acquire time; taking over an
    existing Lease (held or released) counts one more transition, as client-go does."""
    stamp = micro_time(at)
    ours = record is not None and record.holder == me
    transitions = (record.transitions if record else 0) + (1 if record is not None and not ours else 0)
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": math.ceil(duration),
        "acquireTime": (record.acquired if ours and record else None) or stamp,
        "renewTime": stamp,
        "leaseTransitions": transitions,
    }


def released(record: LeaseRecord, at: datetime) -> dict[str, Any]:
    """The spec a leader leaves behind when it stops gracefully (client-go's ReleaseOnCancel): no holder,
    so a standby takes the Lease at its next attempt."""
    stamp = micro_time(at)
    return {"holderIdentity": None, "leaseDurationSeconds": 1, "acquireTime": stamp, "renewTime": stamp,
            "leaseTransitions": record.transitions}  # fmt: skip


def lease_namespace(setting: str, sa_file: Path = SA_NAMESPACE) -> str:
    """The configured namespace; else the pod's own (its service account's); else "default"."""
    if setting:
        return setting
    try:
        return sa_file.read_text().strip() or "default"
    except OSError:
        return "default"


def new_identity() -> str:
    """The pod name (the hostname in a pod) and a random suffix: a restarted process is a new candidate."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ the elector


class Elector:
    """One candidate for one Lease. `acquire()` blocks until this process leads; `keep()` renews it in a
    thread and calls `on_lost` when it cannot; `release()` gives it up."""

    def __init__(
        self, namespace: str, name: str, identity: str, *, lease_duration: float = 15.0, renew_deadline: float = 10.0,
        retry_period: float = 2.0, api: Any = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline, self.retry_period = (
            lease_duration,
            renew_deadline,
            retry_period,
        )
        # Its own client and pool, outside the operator's QPS limit: a burst of reconciles never delays a renewal.
        self._api = api if api is not None else client.CoordinationV1Api(counting_client())
        self._clock = clock
        self._timeout = max(1.0, min(renew_deadline / 2, 5.0))
        self.observed: LeaseRecord | None = None
        self.observed_at = 0.0
        self.previous_holder: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Elector:
        return cls(
            lease_namespace(settings.leader_elect_namespace), settings.leader_elect_lease_name, new_identity(),
            lease_duration=settings.leader_elect_lease_duration, renew_deadline=settings.leader_elect_renew_deadline,
            retry_period=settings.leader_elect_retry_period,
        )  # fmt: skip

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"

    # -------------------------------------------------------------- one attempt

    def try_acquire_or_renew(self) -> Outcome:
        try:
            lease = self._read()
            if lease is None:
                return self._create()
            record = self._observe(LeaseRecord.of(lease))
            if not may_take(record, self.identity, self.observed_at, self._clock(), self.lease_duration):
                return Outcome.HELD
            if record.holder != self.identity:
                self.previous_holder = record.holder
            lease["spec"] = {
                **(lease.get("spec") or {}),
                **claim(record, self.identity, self.lease_duration, datetime.now(timezone.utc)),
            }
            self._observe(LeaseRecord.of(self._write(lease)))
            return Outcome.LEADING
        except ApiException as exc:
            if exc.status == 409:  # another candidate wrote first
                return Outcome.HELD
            log.warning("leader election: lease %s: %s %s", self.where, exc.status, exc.reason)
            return Outcome.ERROR
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            log.warning("leader election: lease %s: %s", self.where, exc)
            return Outcome.ERROR

    def _observe(self, record: LeaseRecord) -> LeaseRecord:
        if record != self.observed:
            self.observed, self.observed_at = record, self._clock()
        return record

    def _read(self) -> dict[str, Any] | None:
        try:
            resp = self._api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)  # type: ignore[no-any-return]

    def _create(self) -> Outcome:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": standard_labels(self.name, "leader-election", APP_OPERATOR),
            },
            "spec": claim(None, self.identity, self.lease_duration, datetime.now(timezone.utc)),
        }
        resp = self._api.create_namespaced_lease(
            self.namespace, body, _preload_content=False, _request_timeout=self._timeout
        )
        self._observe(LeaseRecord.of(json.loads(resp.data)))
        return Outcome.LEADING

    def _write(self, lease: dict[str, Any]) -> dict[str, Any]:
        resp = self._api.replace_namespaced_lease(
            self.name, self.namespace, lease, _preload_content=False, _request_timeout=self._timeout
        )
        return json.loads(resp.data)  # type: ignore[no-any-return]

    # -------------------------------------------------------------- the loops

    def acquire(self) -> float:
        """Block until this candidate holds the Lease; the seconds it stood by."""
        started = self._clock()
        while self.try_acquire_or_renew() is not Outcome.LEADING:
            time.sleep(self.retry_period * (1 + random.random() * 0.2))  # noqa: S311 - jitter, not crypto
        return self._clock() - started

    def renew_once(self) -> str | None:
        """Renew within the renew deadline; None when renewed, else why leadership is lost."""
        deadline = self._clock() + self.renew_deadline
        while True:
            outcome = self.try_acquire_or_renew()
            if outcome is Outcome.LEADING:
                return None
            if outcome is Outcome.HELD:
                return f"the lease is held by {self.observed.holder if self.observed else 'another replica'}"
            if self._clock() + self.retry_period >= deadline:
                return f"could not renew it for {self.renew_deadline:g} s"
            if self._stop.wait(self.retry_period):
                return None

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every retry period in a daemon thread; `on_lost(reason)` when leadership is lost."""

        def renew() -> None:
            while not self._stop.wait(self.retry_period):
                reason = self.renew_once()
                if reason is not None and not self._stop.is_set():
                    on_lost(reason)
                    return

        self._thread = threading.Thread(target=renew, name="leader-election", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and, when this process still holds the Lease, leave it free for a standby."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout * 2 + self.retry_period)
        try:
            lease = self._read()
            if lease is None or LeaseRecord.of(lease).holder != self.identity:
                return
            lease["spec"] = {
                **(lease.get("spec") or {}),
                **released(LeaseRecord.of(lease), datetime.now(timezone.utc)),
            }
            self._write(lease)
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            log.warning(
                "leader election: could not release lease %s (%s); a standby takes over when it expires",
                self.where,
                exc,
            )
            return
        METRICS.leader.set(0)
        log.info("leader election: %s released lease %s", self.identity, self.where)


# ------------------------------------------------------------------ the process


def lead(settings: Settings, elector: Elector | None = None) -> Elector:
    """Stand by until this process leads (answering the liveness probe meanwhile), then keep the lease in a
    thread; losing it ends the process at once. Returns the elector, for `release()` at shutdown."""
    elector = elector or Elector.from_settings(settings)
    METRICS.leader.set(0)
    log.info(
        "leader election: %s standing by for lease %s (duration %g s, renew deadline %g s, retry %g s)",
        elector.identity, elector.where, elector.lease_duration, elector.renew_deadline, elector.retry_period,
    )  # fmt: skip
    health = serve_standby_health(settings.liveness) if settings.liveness else None
    try:
        waited = elector.acquire()
    finally:
        if health is not None:
            health.shutdown()
            health.server_close()  # Kopf's liveness endpoint takes the port over
    METRICS.leader.set(1)
    log.info(
        "leader election: %s acquired lease %s after %.1f s standing by (previous holder: %s); reconciling",
        elector.identity, elector.where, waited, elector.previous_holder or "none, it was free",
    )  # fmt: skip
    elector.keep(lambda reason: exit_now(elector, reason))
    return elector


def exit_now(elector: Elector, reason: str) -> None:
    """A leader that lost its lease stops reconciling at once: no graceful shutdown that would keep writing."""
    METRICS.leader.set(0)
    log.error("leader election: %s lost lease %s: %s; exiting (%d) to restart as a standby", elector.identity,
              elector.where, reason, LOST_LEASE_EXIT)  # fmt: skip
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(LOST_LEASE_EXIT)


def serve_standby_health(url: str) -> ThreadingHTTPServer | None:
    """Answer the liveness URL with 200 while standing by (Kopf serves it once this process leads)."""
    parts = urlsplit(url)
    path = parts.path or "/"

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            ok = self.path.split("?")[0] == path
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"standby\n" if ok else b"")

        def log_message(self, *_: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Health)  # noqa: S104
    except OSError as exc:
        log.warning("leader election: liveness %s not served while standing by: %s", url, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server
