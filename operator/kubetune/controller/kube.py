"""The operator's only writes (and few reads) to the Kubernetes API: `KubeClient`, the `Cluster`
(kubetune.controller.cluster) of a real API server.

Thin wrappers over the official client that speak plain dicts, treat 404 as "absent" and 409 on
create as "already there" (so a restarted operator never duplicates a workload). Every call goes
through one connection pool, a token bucket (bounded QPS, like client-go's) and a retry with
exponential back-off on 429 and 5xx (honouring Retry-After); `KubeClient.request` is the one place
the client's errors become the interface's. Reads of Jobs and Pods come from the watch cache
(`kubetune.controller.store`), not from here.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.api.names import standard_labels
from kubetune.controller.cluster import ApiMissing
from kubetune.controller.metrics import counting_client
from kubetune.status.progress import request_checkpoint

T = TypeVar("T")
log = logging.getLogger("kubetune.kube")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _bearer_token_compat()


def _bearer_token_compat() -> None:
    """kubernetes-client 36 reads the token from `api_key["BearerToken"]`, but its own config
    loaders (kube config and in-cluster) still store it under `api_key["authorization"]`: every
    call went out anonymous (403 for `system:anonymous`), found by the e2e suite running the
    operator under a ServiceAccount token. Mirror the key, also after each token refresh."""
    cfg = client.Configuration.get_default_copy()
    token = cfg.api_key.get("authorization")
    if not token or "BearerToken" in cfg.api_key:
        return
    cfg.api_key["BearerToken"] = token
    refresh = cfg.refresh_api_key_hook

    def _refresh(c: Any) -> None:
        if refresh is not None:
            refresh(c)
        if c.api_key.get("authorization"):
            c.api_key["BearerToken"] = c.api_key["authorization"]

    cfg.refresh_api_key_hook = _refresh
    client.Configuration.set_default(cfg)


# ------------------------------------------------------------------ rate limit and retry


class TokenBucket:
    """`qps` requests per second on average, `burst` at once; `acquire()` blocks until a token is free."""

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps, self.burst = qps, burst
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it (0 when one was free)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def acquire(self) -> float:
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


def backoff(attempt: int, base: float = 0.25, cap: float = 8.0) -> float:
    """Exponential back-off with full jitter for the n-th retry (0-based)."""
    return random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto


def retry_after(exc: ApiException) -> float | None:
    value = (exc.headers or {}).get("Retry-After") if exc.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


ATTEMPTS = 5


def _data(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)  # type: ignore[no-any-return]


def _drain(resp: Any) -> None:
    """Read an unread response (`_preload_content=False`) so its connection goes back to the pool. Left unread,
    urllib3 never returns it: every such call cost the next one a new TLS connection (a handshake on both
    sides; py-spy of the operator under a burst of 500 new jobs, bench/results)."""
    resp.data  # noqa: B018 - reading the body releases the connection


CUSTOM_PLURALS = {"InferenceService": "inferenceservices", "PodGroup": "podgroups"}
"""Kinds of other projects' CRDs the operator creates (KServe; the gang schedulers' PodGroups)."""

ABSENT = None
"""In `KubeClient.request(on=...)`: answer None for this HTTP status instead of raising."""


class KubeClient:
    """The `Cluster` of a real API server. One instance per operator process holds what was process-global:
    one ApiClient (one connection pool), the token bucket, the request counters and the Event recorder."""

    def __init__(self, qps: float = 100.0, burst: int = 500, api: client.ApiClient | None = None) -> None:
        self.limiter = TokenBucket(qps=qps, burst=burst)
        self.calls = 0
        self.throttled_ms = 0
        self.events = EventRecorder(post=self.create_event)
        self._api_client = api
        self._lock = threading.Lock()

    # ------------------------------------------------------------ transport

    def api_client(self) -> client.ApiClient:
        """One ApiClient (one connection pool) for every call, made on first use (after `load_config()`): a new
        client per call opened a new TLS connection."""
        with self._lock:
            if self._api_client is None:
                _bearer_token_compat()
                cfg = client.Configuration.get_default_copy()
                cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, 64)
                client.Configuration.set_default(cfg)
                self._api_client = counting_client()  # every request counted in kubetune_api_requests_total
            return self._api_client

    def _api(self, cls: Any) -> Any:
        return cls(self.api_client())

    def call(self, fn: Callable[..., T], *args: Any, attempts: int = ATTEMPTS, sleep: Callable[[float], None] = time.sleep,
             **kw: Any) -> T:  # fmt: skip
        """`fn(*args, **kw)` under the QPS limit, retried on 429, 5xx and connection errors with back-off."""
        for attempt in range(attempts):
            waited = self.limiter.acquire()
            with self._lock:
                self.calls += 1
                self.throttled_ms += int(waited * 1000)
            try:
                return fn(*args, **kw)
            except ApiException as exc:
                if exc.status not in RETRY_STATUSES or attempt == attempts - 1:
                    raise
                sleep(retry_after(exc) or backoff(attempt))
            except urllib3.exceptions.HTTPError:
                if attempt == attempts - 1:
                    raise
                sleep(backoff(attempt))
        raise AssertionError("unreachable")

    def request(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        on: Mapping[int, Exception | None] | None = None,
        refusal: bool = False,
        read: bool = True,
        attempts: int = ATTEMPTS,
        **kw: Any,
    ) -> dict[str, Any] | None:
        """The one translation of the client's errors into the `Cluster` interface's: `fn(*args, **kw)` through
        `call()`; the answer's JSON (`read`), or None. An HTTP status in `on` answers None (ABSENT) or raises
        the exception given; a 400 or 422 is a PermanentError when `refusal` (the object will never be
        accepted); any other failure is a TemporaryError naming `what`."""
        try:
            resp = self.call(fn, *args, _preload_content=False, attempts=attempts, **kw)
        except ApiException as exc:
            if on is not None and exc.status in on:
                outcome = on[exc.status]
                if outcome is None:
                    return None
                raise outcome from exc
            if refusal and exc.status in (400, 422):
                raise kopf.PermanentError(f"{what} refused by the API server: {exc.body}") from exc
            raise kopf.TemporaryError(f"{what}: {exc.status} {exc.reason}", delay=10) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise kopf.TemporaryError(f"{what}: {exc}", delay=10) from exc
        if read:
            return _data(resp)
        _drain(resp)
        return None

    # ------------------------------------------------------------ the Cluster interface

    def create_if_absent(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; the created object, or None when it already existed. Refused objects are permanent
        errors; a kind the API server does not serve raises ApiMissing."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        on: dict[int, Exception | None] = {409: ABSENT}
        fn: Callable[..., Any]
        if kind in CUSTOM_PLURALS:
            group, version = obj["apiVersion"].split("/")
            custom = self._api(client.CustomObjectsApi).create_namespaced_custom_object
            on[404] = ApiMissing(obj["apiVersion"])  # the namespace exists (we are in it): the API does not
            plural = CUSTOM_PLURALS[kind]

            def fn(namespace: str, body: dict[str, Any], **kw: Any) -> Any:
                return custom(group, version, namespace, plural, body, **kw)
        elif kind == "Deployment":
            fn = self._api(client.AppsV1Api).create_namespaced_deployment
        elif kind == "ConfigMap":
            fn = self._api(client.CoreV1Api).create_namespaced_config_map
        elif kind == "Service":
            fn = self._api(client.CoreV1Api).create_namespaced_service
        elif kind == "Job":
            fn = self._api(client.BatchV1Api).create_namespaced_job
        else:
            raise ValueError(kind)
        return self.request(f"create {kind} {obj['metadata']['name']}", fn, ns, obj, on=on, refusal=True)

    def _serving_calls(self, obj: dict[str, Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(read, replace) for an InferenceService or a Deployment, each called as fn(name, namespace[, body])."""
        if obj["kind"] == "Deployment":
            apps = self._api(client.AppsV1Api)
            return apps.read_namespaced_deployment, apps.replace_namespaced_deployment
        group, version = obj["apiVersion"].split("/")
        custom = self._api(client.CustomObjectsApi)

        def read(name: str, namespace: str, **kw: Any) -> Any:
            return custom.get_namespaced_custom_object(
                group, version, namespace, "inferenceservices", name, **kw
            )

        def replace(name: str, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
            return custom.replace_namespaced_custom_object(
                group, version, namespace, "inferenceservices", name, body, **kw
            )

        return read, replace

    def read_serving(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        meta = obj["metadata"]
        read = self._serving_calls(obj)[0]
        return self.request(
            f"read {obj['kind']} {meta['name']}", read, meta["name"], meta["namespace"], on={404: ABSENT}
        )

    def replace_serving(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        replace = self._serving_calls(obj)[1]
        done = self.request(
            f"replace {obj['kind']} {meta['name']}",
            replace,
            meta["name"],
            meta["namespace"],
            obj,
            refusal=True,
        )
        assert done is not None
        return done

    def delete_job(self, namespace: str, name: str, propagation: str = "Foreground") -> dict[str, Any] | None:
        """Delete a workload Job and (Foreground) its pods before the Job itself goes; the Job as the
        delete left it (with its deletionTimestamp while the pods go), or None when it is gone."""
        options = client.V1DeleteOptions(propagation_policy=propagation)
        delete = self._api(client.BatchV1Api).delete_namespaced_job
        obj = self.request(f"delete Job {name}", delete, name, namespace, body=options, on={404: ABSENT})
        if obj is None:
            return None
        return (
            obj if obj.get("kind") == "Job" and (obj.get("metadata") or {}).get("deletionTimestamp") else None
        )

    def delete_pod(
        self, namespace: str, name: str, grace_seconds: int | None = None
    ) -> dict[str, Any] | None:
        delete = self._api(client.CoreV1Api).delete_namespaced_pod
        options = client.V1DeleteOptions(grace_period_seconds=grace_seconds)
        obj = self.request(f"delete Pod {name}", delete, name, namespace, body=options, on={404: ABSENT})
        if obj is None:
            return None
        return (
            obj if obj.get("kind") == "Pod" and (obj.get("metadata") or {}).get("deletionTimestamp") else None
        )

    def fail_pod(self, namespace: str, name: str, reason: str, message: str) -> dict[str, Any] | None:
        patch = {"status": {"phase": "Failed", "reason": reason, "message": message}}
        patch_status = self._api(client.CoreV1Api).patch_namespaced_pod_status
        return self.request(f"fail Pod {name}", patch_status, name, namespace, patch, on={404: ABSENT},
                            _content_type="application/merge-patch+json")  # fmt: skip

    def release_pod(
        self, namespace: str, name: str, gate: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any] | None:
        # A strategic merge patch: schedulingGates merge by name, so `$patch: delete` removes this gate alone (a
        # merge patch would replace the list, dropping another controller's gate).
        patch = {"metadata": {"labels": labels, "annotations": annotations},
                 "spec": {"schedulingGates": [{"name": gate, "$patch": "delete"}]}}  # fmt: skip
        patch_pod = self._api(client.CoreV1Api).patch_namespaced_pod
        return self.request(f"release Pod {name}", patch_pod, name, namespace, patch, on={404: ABSENT},
                            _content_type="application/strategic-merge-patch+json")  # fmt: skip

    def patch_config_map(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        patch_cm = self._api(client.CoreV1Api).patch_namespaced_config_map
        self.request(f"patch ConfigMap {name}", patch_cm, name, namespace, patch, read=False)

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        patch_job = self._api(client.BatchV1Api).patch_namespaced_job
        return self.request(f"patch Job {name}", patch_job, name, namespace, patch, on={404: ABSENT})

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        patch = self._api(client.CustomObjectsApi).patch_namespaced_custom_object_status
        return self.request(f"patch status of {name}", patch, GROUP, VERSION, namespace, PLURAL, name, {"status": status},
                            on={404: ABSENT})  # fmt: skip

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        delete = self._api(client.CustomObjectsApi).delete_namespaced_custom_object
        options = client.V1DeleteOptions(propagation_policy="Background")
        self.request(f"delete FineTuneJob {name}", delete, GROUP, VERSION, namespace, PLURAL, name, body=options,
                     on={404: ABSENT}, read=False)  # fmt: skip

    def create_event(self, event: dict[str, Any]) -> None:
        """POST one Event now. Best effort: never raises."""
        create = self._api(client.CoreV1Api).create_namespaced_event
        try:
            self.request(f"create Event {event['metadata'].get('generateName', '')}", create, event["metadata"]["namespace"],
                         event, read=False, attempts=3)  # fmt: skip
        except kopf.TemporaryError:
            pass

    def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Queue an Event on the FineTuneJob (posted by the recorder's thread). Never raises, never waits."""
        self.events.record(event_for(body, type_, reason, message))

    def request_checkpoint(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        return request_checkpoint(pod)

    def flush_events(self, timeout: float) -> bool:
        return self.events.flush(timeout)


def event_for(body: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event on the FineTuneJob (what `kubectl describe` shows), stamped now."""
    meta = body["metadata"]
    now = datetime.now(timezone.utc)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{meta['name']}.",
            "namespace": meta["namespace"],
            "labels": standard_labels(meta["name"], "event"),
        },
        "involvedObject": {
            "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": body.get("kind", "FineTuneJob"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kubetune"},
        "reportingComponent": "kubetune",
        "firstTimestamp": now.isoformat(),
        "lastTimestamp": now.isoformat(),
        "count": 1,
    }


class EventRecorder:
    """Events leave the reconcile path, as with client-go's event broadcaster: `record` queues one and returns;
    one background thread posts them in order, one at a time. Under a burst of new jobs the workers' writes
    (Jobs, status) go first and the Events trail them, instead of each job waiting for its Event. At most
    `maxlen` wait; beyond that the oldest is dropped (Events are best effort, like the broadcaster's)."""

    def __init__(self, post: Callable[[dict[str, Any]], None], maxlen: int = 1000) -> None:
        self._post = post
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def record(self, event: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="events", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                event = self._queue.popleft()
                self._busy = True
            try:
                self._post(event)
            except Exception:  # noqa: BLE001 - best effort; the thread must live on
                log.exception("posting an Event failed")

    def flush(self, timeout: float) -> bool:
        """Wait until every queued Event is posted; False if some are still waiting after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)
