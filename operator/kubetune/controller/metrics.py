"""The operator's Prometheus metrics (prometheus-client), served on the metrics port.

The handlers call the small functions at the bottom (`observe_event`, `reconciling`,
`workload_created`); `counting_client()` (the operator's kubernetes client) and `counted_session()`
(Kopf's aiohttp session: its lists and watch streams) count every Kubernetes API call the process makes.
Per-job training metrics are re-exported from the status the operator writes from rank 0's
progress, so training pods need no scrape rules. Every name here is listed in docs/operations/metrics.md
and the Grafana dashboard uses only these (tests/test_metrics.py checks both).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: they double the series count and nothing here uses them

PHASES = ("Pending", "Initializing", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# (metric name, Progress field, help) of the per-job gauges re-exported from status.progress.
JOB_GAUGES = (
    ("kubetune_job_step", "step", "Optimizer step rank 0 last reported."),
    ("kubetune_job_total_steps", "totalSteps", "Steps the job will run."),
    ("kubetune_job_progress_ratio", "percent", "Fraction of the steps done (0-1)."),
    ("kubetune_job_loss", "loss", "Training loss rank 0 last reported."),
    ("kubetune_job_eval_loss", "evalLoss", "Last evaluation loss."),
    ("kubetune_job_learning_rate", "learningRate", "Current learning rate."),
    (
        "kubetune_job_tokens_per_second",
        "tokensPerSecond",
        "Training throughput of the whole gang (tokens/s).",
    ),
    ("kubetune_job_eta_seconds", "etaSeconds", "Estimated seconds until the last step."),
)


# (metric name, status.usage field, help) of the per-job usage counters.
USAGE_COUNTERS = (
    (
        "kubetune_job_gpu_seconds_total",
        "gpuSeconds",
        "GPU-seconds each job used, restarts included, suspended time excluded (status.usage).",
    ),
    (
        "kubetune_job_node_seconds_total",
        "nodeSeconds",
        "Trainer pod-seconds (one pod per node) each job used (status.usage).",
    ),
    (
        "kubetune_job_wall_seconds_total",
        "wallSeconds",
        "Seconds each job was active, suspended time excluded (status.usage).",
    ),
)


def _time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class JobState:
    namespace: str
    name: str
    phase: str = "Pending"
    progress: dict[str, Any] | None = None
    restarts: int = 0
    gpus: int = 0
    running_since: float | None = None  # when this process last saw it start running (for GPU-seconds)
    usage: dict[str, Any] | None = (
        None  # status.usage: the operator's accrued figures (kubetune.status.usage)
    )
    phase_since: float | None = None
    last_step_at: float | None = None


class Metrics(Collector):
    """All operator metrics; one instance (`METRICS`) registers with the default registry."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        self.jobs: dict[str, JobState] = {}
        self.gpu_seconds: dict[str, float] = {}  # namespace -> GPU-seconds of jobs that stopped running
        self.reconcile_duration = Histogram("kubetune_reconcile_duration_seconds", "Time one handler call took.",
                                            ["handler"], registry=registry)  # fmt: skip
        self.reconcile_errors = Counter("kubetune_reconcile_errors_total", "Handler calls that raised (Kopf retries them).",
                                        ["handler", "error"], registry=registry)  # fmt: skip
        self.time_to_workload = Histogram("kubetune_time_to_workload_seconds",
                                          "From FineTuneJob creation to its first workload Job created.",
                                          buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.time_to_progress = Histogram("kubetune_time_to_first_progress_seconds",
                                          "From FineTuneJob creation to the first progress read from rank 0.",
                                          buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.restarts = Counter("kubetune_gang_restarts_total", "Whole-gang restarts, by the failed rank's reason.",
                                ["namespace", "reason"], registry=registry)  # fmt: skip
        self.api_requests = Counter("kubetune_api_requests_total",
                                    "Kubernetes API requests the operator made, by verb, resource and HTTP code (0: no answer).",
                                    ["verb", "resource", "code"], registry=registry)  # fmt: skip
        self.leader = Gauge("kubetune_leader", "1 while this replica reconciles (holds the leader Lease, or runs without "
                            "leader election); 0 while it stands by.", registry=registry)  # fmt: skip
        if registry is not None:
            registry.register(self)

    # ------------------------------------------------------------ observing

    def observe(self, event: str | None, body: dict[str, Any], now: float | None = None) -> None:
        """A FineTuneJob as the watch delivered it (Kopf's on.event): phase, progress, restarts."""
        now = time.time() if now is None else now
        meta = body.get("metadata") or {}
        key = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        if event == "DELETED":
            state = self.jobs.pop(key, None)
            if state is not None:
                self._stop_running(state, now)
            return
        status = body.get("status") or {}
        spec = body.get("spec") or {}
        dist = spec.get("distributed") or {}
        state = self.jobs.get(key)
        fresh = state is None
        if state is None:
            state = self.jobs[key] = JobState(meta.get("namespace") or "", meta.get("name") or "",
                                              restarts=int(status.get("restarts") or 0))  # fmt: skip
        state.gpus = int(dist.get("nodes") or 1) * int(dist.get("gpusPerNode") or 0)
        phase = status.get("phase") or "Pending"
        if phase != state.phase or state.phase_since is None:
            state.phase_since = now
        if phase == "Running" and state.running_since is None:
            state.running_since = now
        elif phase != "Running":
            self._stop_running(state, now)
        state.phase = phase
        restarts = int(status.get("restarts") or 0)
        if restarts > state.restarts:
            reason = ((status.get("lastFailure") or {}).get("reason")) or "Unknown"
            self.restarts.labels(state.namespace, reason).inc(restarts - state.restarts)
        state.restarts = max(state.restarts, restarts)
        state.usage = status.get("usage") or None
        progress = status.get("progress") or None
        had_step = bool(state.progress and state.progress.get("step") is not None)
        if progress and progress.get("step") is not None:
            if not had_step and not fresh:  # seen before without progress: this is the first reading
                created = _time(meta.get("creationTimestamp"))
                if created is not None:
                    self.time_to_progress.observe(max(0.0, now - created))
            if not had_step or (state.progress or {}).get("step") != progress.get("step"):
                state.last_step_at = now
        state.progress = progress or state.progress

    def _stop_running(self, state: JobState, now: float) -> None:
        if state.running_since is not None:
            self.gpu_seconds[state.namespace] = self.gpu_seconds.get(state.namespace, 0.0) + state.gpus * (
                now - state.running_since
            )
            state.running_since = None

    def workload_created(self, meta: dict[str, Any], now: float | None = None) -> None:
        created = _time(meta.get("creationTimestamp"))
        if created is not None:
            self.time_to_workload.observe(max(0.0, (time.time() if now is None else now) - created))

    # ------------------------------------------------------------ exporting

    def collect(self, now: float | None = None) -> Iterator[Any]:
        now = time.time() if now is None else now
        by_phase = GaugeMetricFamily(
            "kubetune_finetunejobs", "FineTuneJobs by namespace and phase.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        namespaces = {s.namespace for s in self.jobs.values()}
        for ns in namespaces:
            for phase in PHASES:
                counts[(ns, phase)] = 0
        for s in self.jobs.values():
            counts[(s.namespace, s.phase)] = counts.get((s.namespace, s.phase), 0) + 1
        for (ns, phase), n in sorted(counts.items()):
            by_phase.add_metric([ns, phase], n)
        yield by_phase

        phase_age = GaugeMetricFamily("kubetune_job_phase_seconds", "Seconds each job has been in its current phase.",
                                      labels=["namespace", "finetunejob", "phase"])  # fmt: skip
        since_step = GaugeMetricFamily("kubetune_job_seconds_since_progress",
                                       "Seconds since a running job's step last advanced.", labels=["namespace", "finetunejob"])  # fmt: skip
        gauges = {
            name: GaugeMetricFamily(name, help_, labels=["namespace", "finetunejob"])
            for name, _, help_ in JOB_GAUGES
        }
        restarts = GaugeMetricFamily(
            "kubetune_job_restarts",
            "Whole-gang restarts of each job so far.",
            labels=["namespace", "finetunejob"],
        )
        for s in sorted(self.jobs.values(), key=lambda s: (s.namespace, s.name)):
            labels = [s.namespace, s.name]
            restarts.add_metric(labels, s.restarts)
            if s.phase_since is not None:
                phase_age.add_metric([*labels, s.phase], now - s.phase_since)
            if s.phase == "Running" and s.last_step_at is not None:
                since_step.add_metric(labels, now - s.last_step_at)
            for name, field, _ in JOB_GAUGES:
                value = (s.progress or {}).get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gauges[name].add_metric(labels, value / 100.0 if field == "percent" else float(value))
        yield from gauges.values()
        yield from self._usage()
        yield restarts
        yield phase_age
        yield since_step

        gpu = CounterMetricFamily("kubetune_gpu_seconds", "GPU-seconds of running jobs (nodes x gpusPerNode while Running).",
                                  labels=["namespace"])  # fmt: skip
        totals = dict(self.gpu_seconds)
        for s in self.jobs.values():
            if s.running_since is not None:
                totals[s.namespace] = totals.get(s.namespace, 0.0) + s.gpus * (now - s.running_since)
        for ns, value in sorted(totals.items()):
            gpu.add_metric([ns], value)
        yield gpu

    def _usage(self) -> Iterator[Any]:
        """status.usage per job: counters (they only grow while the job exists), and the estimated cost."""
        labels = ["namespace", "finetunejob"]
        counters = {
            field: CounterMetricFamily(name, help_, labels=labels) for name, field, help_ in USAGE_COUNTERS
        }
        cost = GaugeMetricFamily("kubetune_job_estimated_cost", "Estimated cost of each job so far (status.usage, from the price table).",
                                 labels=[*labels, "currency"])  # fmt: skip
        for s in sorted(self.jobs.values(), key=lambda s: (s.namespace, s.name)):
            usage = s.usage or {}
            for _name, field, _ in USAGE_COUNTERS:
                if isinstance(usage.get(field), int | float):
                    counters[field].add_metric([s.namespace, s.name], float(usage[field]))
            if isinstance(usage.get("estimatedCost"), int | float):
                cost.add_metric(
                    [s.namespace, s.name, str(usage.get("currency") or "")], float(usage["estimatedCost"])
                )
        yield from counters.values()
        yield cost

    def describe(self) -> Iterator[Any]:
        return iter(())  # names are dynamic per scrape; nothing to check at registration

    # ------------------------------------------------------------ reconcile timing

    @contextmanager
    def reconciling(self, handler: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.reconcile_errors.labels(handler, type(exc).__name__).inc()
            raise
        finally:
            self.reconcile_duration.labels(handler).observe(time.perf_counter() - started)

    def api_request(self, method: str, url: str, code: int) -> None:
        verb, resource = api_call(method, url)
        self.api_requests.labels(verb, resource, str(code)).inc()


_PATH = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)(?:/namespaces/[^/]+)?/(?P<rest>[^?]*)")
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def api_call(method: str, url: str) -> tuple[str, str]:
    """(verb, resource) as RBAC names them, from a request: GET .../jobs -> list jobs, PATCH .../x/status -> patch x/status."""
    path = url.split("://", 1)[-1]
    path = path[path.find("/") :] if "/" in path else "/"
    m = _PATH.match(path)
    parts = (m["rest"] if m else path.strip("/")).strip("/").split("/")
    resource = parts[0] or "unknown"
    if len(parts) >= 3:
        resource += "/" + parts[2]
    if method.upper() == "GET":
        verb = "watch" if "watch=" in url else ("get" if len(parts) >= 2 else "list")
    else:
        verb = _VERBS.get(method.upper(), method.lower())
    return verb, resource


METRICS = Metrics()


def counting_client() -> Any:
    """A kubernetes ApiClient (default configuration) whose every request is counted."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    class CountingApiClient(client.ApiClient):  # type: ignore[misc]
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            try:
                resp = super().request(method, url, *args, **kwargs)
            except ApiException as exc:
                METRICS.api_request(method, url, exc.status or 0)
                raise
            except Exception:  # no answer at all (connection refused, timeout)
                METRICS.api_request(method, url, 0)
                raise
            METRICS.api_request(method, url, getattr(resp, "status", 200))
            return resp

    return CountingApiClient()


def counting_trace() -> Any:
    """An aiohttp TraceConfig that counts every request of a session, as `counting_client` does for ours.
    A watch is counted once, when its stream opens (the response headers arrive)."""
    import aiohttp

    async def answered(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        METRICS.api_request(params.method, str(params.url), params.response.status)

    async def unanswered(session: Any, ctx: Any, params: aiohttp.TraceRequestExceptionParams) -> None:
        METRICS.api_request(params.method, str(params.url), 0)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(answered)
    trace.on_request_exception.append(unanswered)
    return trace


KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


def keepalive_socket(addr_info: Any) -> socket.socket:
    """A TCP socket with keepalive probes after 30 s idle, every 10 s, 3 unanswered = dead (aiohttp's
    `socket_factory`). Kopf's watch streams then need no timeout of their own to notice a connection that died
    silently (a node or a load balancer gone without a reset): the kernel closes it in about a minute, and
    Kopf re-opens the watch. Probes are TCP segments, not API requests (the role HTTP/2 pings play for
    client-go); they also keep a load balancer's idle timer from dropping a quiet watch."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                       ("TCP_KEEPCNT", KEEPALIVE_PROBES)):  # fmt: skip
        if hasattr(socket, opt):  # Linux; macOS names the first TCP_KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    return sock


def counted_session(info: Any) -> Any:
    """Kopf's connection (a `kopf.ConnectionInfo` from its login) as a `kopf.AiohttpSession` built the way
    Kopf builds its own, plus `counting_trace()`: Kopf's lists, watch streams and patches are counted too.
    Call it inside the event loop (aiohttp binds the session to it)."""
    import aiohttp
    import kopf

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context(), socket_factory=keepalive_socket),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
        trace_configs=[counting_trace()],
    )
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace, priority=info.priority,
                               expiration=info.expiration, aiohttp_session=session)  # fmt: skip


_SERVING: set[int] = set()


def serve(port: int, address: str = "0.0.0.0") -> bool:
    """Serve /metrics (once per port: a standby starts it before Kopf does); False (and the operator carries
    on) when the port is taken."""
    from prometheus_client import start_http_server

    if port in _SERVING:
        return True
    try:
        start_http_server(port, addr=address)
    except OSError:
        return False
    _SERVING.add(port)
    return True
