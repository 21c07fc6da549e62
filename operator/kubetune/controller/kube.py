"""The operator's only writes (and few reads) to the Kubernetes API.

Thin wrappers over the official client that speak plain dicts, treat 404 as "absent" and 409 on
create as "already there" (so a restarted operator never duplicates a workload). Every call goes
through one shared connection pool, a token bucket (bounded QPS, like client-go's) and a retry
with exponential back-off on 429 and 5xx (honouring Retry-After). Reads of Jobs and Pods come from
the watch cache (`kubetune.controller.store`), not from here.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.controller.metrics import counting_client

T = TypeVar("T")
log = logging.getLogger("kubetune.kube")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _bearer_token_compat()
    global _CLIENT  # noqa: PLW0603 - one pool for the process, rebuilt when the config is reloaded
    with _CLIENT_LOCK:
        _CLIENT = None


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
        self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
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


_LIMITER = TokenBucket(qps=100.0, burst=500)
ATTEMPTS = 5
_COUNT_LOCK = threading.Lock()
calls = 0
"""API requests made by this process (read by the operator's own log line and the tests)."""
throttled_ms = 0
"""Milliseconds calls waited for the QPS limit (the log line: whether the limit, not the server, held them)."""


def configure_limits(qps: float, burst: int) -> None:
    global _LIMITER  # noqa: PLW0603
    _LIMITER = TokenBucket(qps=qps, burst=burst)


def call(fn: Callable[..., T], *args: Any, attempts: int = ATTEMPTS, sleep: Callable[[float], None] = time.sleep, **kw: Any) -> T:
    """`fn(*args, **kw)` under the QPS limit, retried on 429, 5xx and connection errors with back-off."""
    global calls, throttled_ms  # noqa: PLW0603
    for attempt in range(attempts):
        waited = _LIMITER.acquire()
        with _COUNT_LOCK:
            calls += 1
            throttled_ms += int(waited * 1000)
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


_CLIENT: client.ApiClient | None = None
_CLIENT_LOCK = threading.Lock()


def api_client() -> client.ApiClient:
    """One ApiClient (one connection pool) for every call: a new client per call opened a new TLS connection."""
    global _CLIENT  # noqa: PLW0603
    with _CLIENT_LOCK:
        if _CLIENT is None:
            _bearer_token_compat()
            cfg = client.Configuration.get_default_copy()
            cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, 64)
            client.Configuration.set_default(cfg)
            _CLIENT = counting_client()  # every request counted in kubetune_api_requests_total
        return _CLIENT


def _api(cls: Any) -> Any:
    return cls(api_client())


def _data(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)  # type: ignore[no-any-return]


def _drain(resp: Any) -> None:
    """Read an unread response (`_preload_content=False`) so its connection goes back to the pool. Left unread,
    urllib3 never returns it: every such call cost the next one a new TLS connection (a handshake on both
    sides; py-spy of the operator under a burst of 500 new jobs, bench/results)."""
    resp.data  # noqa: B018 - reading the body releases the connection


def _temporary(exc: Exception, what: str) -> kopf.TemporaryError:
    if isinstance(exc, ApiException):
        return kopf.TemporaryError(f"{what}: {exc.status} {exc.reason}", delay=10)
    return kopf.TemporaryError(f"{what}: {exc}", delay=10)


# ------------------------------------------------------------------ calls


class ApiMissing(Exception):
    """The API server does not serve the object's kind (e.g. KServe's CRDs are not installed)."""


def create_if_absent(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Create `obj`; the created object, or None when it already existed. Refused objects are permanent
    errors; a kind the API server does not serve raises ApiMissing."""
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    fn: Callable[..., Any]
    if kind == "InferenceService":
        group, version = obj["apiVersion"].split("/")
        custom = _api(client.CustomObjectsApi).create_namespaced_custom_object

        def fn(namespace: str, body: dict[str, Any], **kw: Any) -> Any:
            return custom(group, version, namespace, "inferenceservices", body, **kw)
    elif kind == "Deployment":
        fn = _api(client.AppsV1Api).create_namespaced_deployment
    elif kind == "ConfigMap":
        fn = _api(client.CoreV1Api).create_namespaced_config_map
    elif kind == "Service":
        fn = _api(client.CoreV1Api).create_namespaced_service
    elif kind == "Job":
        fn = _api(client.BatchV1Api).create_namespaced_job
    else:
        raise ValueError(kind)
    try:
        return _data(call(fn, ns, obj, _preload_content=False))
    except ApiException as exc:
        if exc.status == 409:
            return None
        if exc.status == 404 and kind == "InferenceService":
            raise ApiMissing(obj["apiVersion"]) from exc
        if exc.status in (400, 422):
            raise kopf.PermanentError(f"{kind} {obj['metadata']['name']} refused by the API server: {exc.body}") from exc
        raise _temporary(exc, f"create {kind} {obj['metadata']['name']}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"create {kind} {obj['metadata']['name']}") from exc


def _serving_calls(obj: dict[str, Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(read, replace) for an InferenceService or a Deployment, each called as fn(name, namespace[, body])."""
    if obj["kind"] == "Deployment":
        apps = _api(client.AppsV1Api)
        return apps.read_namespaced_deployment, apps.replace_namespaced_deployment
    group, version = obj["apiVersion"].split("/")
    custom = _api(client.CustomObjectsApi)

    def read(name: str, namespace: str, **kw: Any) -> Any:
        return custom.get_namespaced_custom_object(group, version, namespace, "inferenceservices", name, **kw)

    def replace(name: str, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
        return custom.replace_namespaced_custom_object(group, version, namespace, "inferenceservices", name, body, **kw)

    return read, replace


def read_serving(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The InferenceService or Deployment named like `obj`, or None when there is none."""
    meta = obj["metadata"]
    try:
        return _data(call(_serving_calls(obj)[0], meta["name"], meta["namespace"], _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _temporary(exc, f"read {obj['kind']} {meta['name']}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"read {obj['kind']} {meta['name']}") from exc


def replace_serving(obj: dict[str, Any]) -> dict[str, Any]:
    """Replace the object (obj carries the resourceVersion read); a refusal is a permanent error."""
    meta = obj["metadata"]
    try:
        return _data(call(_serving_calls(obj)[1], meta["name"], meta["namespace"], obj, _preload_content=False))
    except ApiException as exc:
        if exc.status in (400, 422):
            raise kopf.PermanentError(f"{obj['kind']} {meta['name']} refused by the API server: {exc.body}") from exc
        raise _temporary(exc, f"replace {obj['kind']} {meta['name']}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"replace {obj['kind']} {meta['name']}") from exc


def delete_job(namespace: str, name: str, propagation: str = "Foreground") -> dict[str, Any] | None:
    """Delete a workload Job and (Foreground) its pods before the Job itself goes; the Job as the
    delete left it (with its deletionTimestamp while the pods go), or None when it is gone."""
    try:
        resp = call(
            _api(client.BatchV1Api).delete_namespaced_job,
            name,
            namespace,
            body=client.V1DeleteOptions(propagation_policy=propagation),
            _preload_content=False,
        )
    except ApiException as exc:
        if exc.status != 404:
            raise _temporary(exc, f"delete Job {name}") from exc
        return None
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"delete Job {name}") from exc
    obj = _data(resp)
    return obj if obj.get("kind") == "Job" and (obj.get("metadata") or {}).get("deletionTimestamp") else None


def patch_config_map(namespace: str, name: str, patch: dict[str, Any]) -> None:
    try:
        _drain(call(_api(client.CoreV1Api).patch_namespaced_config_map, name, namespace, patch, _preload_content=False))
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise _temporary(exc, f"patch ConfigMap {name}") from exc


def patch_job(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """Merge-patch the workload Job; the patched Job, or None when there is no such Job."""
    try:
        return _data(call(_api(client.BatchV1Api).patch_namespaced_job, name, namespace, patch, _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _temporary(exc, f"patch Job {name}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"patch Job {name}") from exc


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
    """Merge-patch the FineTuneJob's status; the object as written, or None when it is gone."""
    try:
        resp = call(
            _api(client.CustomObjectsApi).patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _preload_content=False,
        )  # fmt: skip
        return _data(resp)
    except ApiException as exc:
        if exc.status == 404:
            return None  # deleted meanwhile
        raise _temporary(exc, f"patch status of {name}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"patch status of {name}") from exc


def delete_finetunejob(namespace: str, name: str) -> None:
    try:
        _drain(call(
            _api(client.CustomObjectsApi).delete_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURAL, name,
            body=client.V1DeleteOptions(propagation_policy="Background"), _preload_content=False,
        ))  # fmt: skip
    except ApiException as exc:
        if exc.status != 404:
            raise _temporary(exc, f"delete FineTuneJob {name}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _temporary(exc, f"delete FineTuneJob {name}") from exc


def event_for(body: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event on the FineTuneJob (what `kubectl describe` shows), stamped now."""
    meta = body["metadata"]
    now = datetime.now(timezone.utc)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
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


def create_event(event: dict[str, Any]) -> None:
    """POST one Event now. Best effort: never raises."""
    try:
        _drain(call(_api(client.CoreV1Api).create_namespaced_event, event["metadata"]["namespace"], event,
                    _preload_content=False, attempts=3))  # fmt: skip
    except (ApiException, urllib3.exceptions.HTTPError):
        pass


class EventRecorder:
    """Events leave the reconcile path, as with client-go's event broadcaster: `record` queues one and returns;
    one background thread posts them in order, one at a time. Under a burst of new jobs the workers' writes
    (Jobs, status) go first and the Events trail them, instead of each job waiting for its Event. At most
    `maxlen` wait; beyond that the oldest is dropped (Events are best effort, like the broadcaster's)."""

    def __init__(self, post: Callable[[dict[str, Any]], None] = create_event, maxlen: int = 1000) -> None:
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


EVENTS = EventRecorder()


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Queue an Event on the FineTuneJob (posted by EVENTS' thread). Never raises, never waits."""
    EVENTS.record(event_for(body, type_, reason, message))
