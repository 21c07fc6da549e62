"""The operator's Prometheus metrics: what each watch event does to them, and that the dashboard and
docs/operations/metrics.md name exactly what a scrape exposes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.controller.metrics import METRICS, Metrics, api_call, counted_session
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ftj(
    phase: str | None = None,
    step: int | None = None,
    loss: float | None = None,
    restarts: int = 0,
    reason: str | None = None,
    name: str = "demo",
    gpus: int = 0,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "restarts": restarts}
    if step is not None:
        status["progress"] = {"step": step, "totalSteps": 100, "percent": float(step), "loss": loss, "evalLoss": 2.5,
                              "tokensPerSecond": 1234.0, "etaSeconds": 60.0}  # fmt: skip
    if reason:
        status["lastFailure"] = {"reason": reason}
    return {"metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "creationTimestamp": "2023-11-14T22:13:20Z"},
            "spec": {"distributed": {"nodes": 2, "gpusPerNode": gpus}}, "status": status}  # fmt: skip


def scrape(m: Metrics, registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics() -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(registry), registry


def test_jobs_are_counted_by_phase_and_forgotten_when_deleted(
    metrics: tuple[Metrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    m.observe("ADDED", ftj("Running", name="a"), T0)
    m.observe("ADDED", ftj("Running", name="b"), T0)
    m.observe("ADDED", ftj("Failed", name="c"), T0)
    s = scrape(m, reg)
    assert s[("kubetune_finetunejobs", (("namespace", "ml"), ("phase", "Running")))] == 2
    assert s[("kubetune_finetunejobs", (("namespace", "ml"), ("phase", "Failed")))] == 1
    assert s[("kubetune_finetunejobs", (("namespace", "ml"), ("phase", "Succeeded")))] == 0
    m.observe("DELETED", ftj("Running", name="a"), T0)
    assert scrape(m, reg)[("kubetune_finetunejobs", (("namespace", "ml"), ("phase", "Running")))] == 1


def test_training_metrics_are_reexported_per_job_from_status_progress(
    metrics: tuple[Metrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    m.observe("MODIFIED", ftj("Running", step=40, loss=1.25), T0)
    s = scrape(m, reg)
    labels = (("finetunejob", "demo"), ("namespace", "ml"))
    assert s[("kubetune_job_loss", labels)] == 1.25
    assert s[("kubetune_job_eval_loss", labels)] == 2.5
    assert s[("kubetune_job_step", labels)] == 40
    assert s[("kubetune_job_progress_ratio", labels)] == pytest.approx(0.4)
    assert s[("kubetune_job_tokens_per_second", labels)] == 1234
    assert s[("kubetune_job_eta_seconds", labels)] == 60


def test_first_progress_latency_is_measured_once_and_only_when_seen_arriving(
    metrics: tuple[Metrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    m.observe("ADDED", ftj("Initializing"), T0 + 5)
    m.observe("MODIFIED", ftj("Running", step=1, loss=3.0), T0 + 12)
    m.observe("MODIFIED", ftj("Running", step=2, loss=2.0), T0 + 14)
    m.observe(
        "ADDED", ftj("Running", step=50, loss=1.0, name="old"), T0 + 999
    )  # already running when we started
    s = scrape(m, reg)
    assert s[("kubetune_time_to_first_progress_seconds_count", ())] == 1
    assert s[("kubetune_time_to_first_progress_seconds_sum", ())] == 12


def test_gang_restarts_are_counted_by_the_failed_ranks_reason(
    metrics: tuple[Metrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    m.observe(
        "ADDED", ftj("Running", restarts=1, reason="Preempted"), T0
    )  # restarts before this process: not counted
    m.observe("MODIFIED", ftj("Restarting", restarts=2, reason="StorageUnavailable"), T0)
    m.observe("MODIFIED", ftj("Running", restarts=2, reason="StorageUnavailable"), T0)
    s = scrape(m, reg)
    assert s[("kubetune_gang_restarts_total", (("namespace", "ml"), ("reason", "StorageUnavailable")))] == 1
    assert ("kubetune_gang_restarts_total", (("namespace", "ml"), ("reason", "Preempted"))) not in s
    assert s[("kubetune_job_restarts", (("finetunejob", "demo"), ("namespace", "ml")))] == 2


def test_gpu_seconds_accumulate_while_running(metrics: tuple[Metrics, CollectorRegistry]) -> None:
    m, reg = metrics
    m.observe("ADDED", ftj("Running", gpus=8), T0)
    m.observe("MODIFIED", ftj("Suspended", gpus=8), T0 + 100)  # 2 nodes x 8 GPUs x 100 s
    m.observe("MODIFIED", ftj("Running", gpus=8), T0 + 500)
    assert {
        s.name: s.value
        for f in m.collect(now=T0 + 510)
        for s in f.samples
        if f.name == "kubetune_gpu_seconds"
    } == {"kubetune_gpu_seconds_total": 16 * 100 + 16 * 10}


def test_status_usage_is_exported_per_job_as_counters_and_the_cost_as_a_gauge(
    metrics: tuple[Metrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    body = ftj("Running", gpus=8)
    body["status"]["usage"] = {
        "wallSeconds": 120.0,
        "nodeSeconds": 240.0,
        "gpuSeconds": 1920.0,
        "estimatedCost": 1.33,
        "currency": "EUR",
    }
    m.observe("MODIFIED", body, T0)
    m.observe("ADDED", ftj("Pending", name="fresh"), T0)  # no usage yet: no series
    got = scrape(m, reg)
    job = (("finetunejob", "demo"), ("namespace", "ml"))
    assert (
        got[("kubetune_job_gpu_seconds_total", job)] == 1920.0
        and got[("kubetune_job_node_seconds_total", job)] == 240.0
    )
    assert got[("kubetune_job_wall_seconds_total", job)] == 120.0
    assert got[("kubetune_job_estimated_cost", (("currency", "EUR"), *job))] == 1.33
    assert not [
        k for k in got if k[0].startswith("kubetune_job_gpu_seconds") and ("finetunejob", "fresh") in k[1]
    ]


def test_a_handler_that_raises_is_timed_and_counted(metrics: tuple[Metrics, CollectorRegistry]) -> None:
    m, reg = metrics
    with pytest.raises(RuntimeError), m.reconciling("poll"):
        raise RuntimeError("boom")
    with m.reconciling("poll"):
        pass
    s = scrape(m, reg)
    assert s[("kubetune_reconcile_errors_total", (("error", "RuntimeError"), ("handler", "poll")))] == 1
    assert s[("kubetune_reconcile_duration_seconds_count", (("handler", "poll"),))] == 2


@pytest.mark.parametrize(("method", "url", "expected"), [
    ("POST", "https://k:6443/apis/batch/v1/namespaces/ml/jobs", ("create", "jobs")),
    ("GET", "https://k:6443/apis/batch/v1/namespaces/ml/jobs/demo-r0", ("get", "jobs")),
    ("GET", "https://k:6443/api/v1/namespaces/ml/pods?labelSelector=x", ("list", "pods")),
    ("PATCH", "https://k:6443/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/demo/status", ("patch", "finetunejobs/status")),
    ("DELETE", "https://k:6443/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/demo", ("delete", "finetunejobs")),
    ("GET", "https://k:6443/api/v1/namespaces?watch=true", ("watch", "namespaces")),
])  # fmt: skip
def test_api_requests_are_named_as_rbac_names_them(method: str, url: str, expected: tuple[str, str]) -> None:
    assert api_call(method, url) == expected


def test_kopfs_session_counts_its_watch_streams_and_refused_connections() -> None:
    """Kopf's lists and watches go through its own aiohttp session, not our kubernetes client: the
    session our login hands Kopf counts them, one per stream opened, into the same counter."""
    import kopf
    from aiohttp import web

    def count(verb: str, resource: str, code: str) -> float:
        return METRICS.api_requests.labels(verb, resource, code)._value.get()  # type: ignore[no-any-return]

    opened: asyncio.Event

    async def pods(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        if request.query.get("watch") == "true":  # a watch: events until the server closes the stream
            await opened.wait()  # the client has looked at its socket
            for i in range(3):
                await resp.write(
                    json.dumps({"type": "ADDED", "object": {"metadata": {"name": f"p{i}"}}}).encode() + b"\n"
                )
        return resp

    async def scenario() -> tuple[float, float, float]:
        nonlocal opened
        opened = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/ml/pods", pods)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        before = count("watch", "pods", "200"), count("list", "pods", "200"), count("list", "pods", "0")
        ctx = counted_session(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
        session = ctx.aiohttp_session
        try:
            async with session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ml/pods?watch=true") as r:
                # a quiet watch that died silently is found by TCP keepalive (the operator sets no watch timeout)
                sock = r.connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                opened.set()
                lines = [line async for line in r.content]
            assert len(lines) == 3
            async with session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ml/pods") as r:
                await r.read()
        finally:
            await runner.cleanup()
        with pytest.raises(OSError):  # the server is gone: no answer, code 0
            await session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ml/pods")
        await session.close()
        after = count("watch", "pods", "200"), count("list", "pods", "200"), count("list", "pods", "0")
        return tuple(a - b for a, b in zip(after, before, strict=True))  # type: ignore[return-value]

    assert asyncio.run(scenario()) == (1, 1, 1)


def exposed_names() -> set[str]:
    """Every series name a scrape returns once a job has run, restarted and been reconciled."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.observe("ADDED", ftj("Initializing", gpus=1), T0)
    m.observe("MODIFIED", ftj("Running", step=3, loss=2.0, restarts=1, reason="Preempted", gpus=1), T0 + 1)
    m.workload_created(ftj()["metadata"], T0 + 1)
    with pytest.raises(ValueError), m.reconciling("poll"):
        raise ValueError
    m.api_request("GET", "https://k/api/v1/namespaces/ml/pods", 200)
    return {
        s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples
    }


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return exprs + [
        v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)
    ]


def test_the_dashboard_is_valid_json_and_uses_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs()
    used = {name for e in exprs for name in re.findall(r"\bkubetune_[a-z_]+", e)}
    assert len(dash["panels"]) >= 10 and len(used) >= 15
    assert used <= exposed_names(), f"not exported: {sorted(used - exposed_names())}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented() -> None:
    docs = (ROOT / "docs" / "operations" / "metrics.md").read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if "seconds_" in n else n for n in exposed_names()}
    kubetune = {n for n in families if n.startswith("kubetune_")}
    assert len(kubetune) >= 18
    assert not [n for n in sorted(kubetune) if f"`{n}`" not in docs]
    # And every name the source spells out, whether or not the scrape above produced a sample of it.
    source = (ROOT / "operator" / "kubetune" / "controller" / "metrics.py").read_text()
    named = set(re.findall(r'"(kubetune_[a-z_]+)"', source))
    # (a counter is exposed with _total, given or not)
    exposed = {f"{n.removesuffix('_total')}_total" if re.search(rf'Counter(?:MetricFamily)?\(\s*"{n}"', source) else n
               for n in named}  # fmt: skip
    assert len(exposed) >= 18
    assert not [n for n in sorted(exposed) if f"`{n}`" not in docs]


def differences(sent: Any, kept: Any, path: str = "") -> list[str]:
    """Where `kept` lost or changed something of `sent` (keys it added, schema defaults, are fine)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [
            d
            for k, v in sent.items()
            for d in (
                differences(v, kept[k], f"{path}/{k}") if k in kept else [f"{path}/{k}: not in the schema"]
            )
        ]
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [
            d
            for i, (a, b) in enumerate(zip(sent, kept, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if sent == kept else [f"{path}: {sent!r} became {kept!r}"]


def grafana_schema() -> None:
    """Register every panel type's options and every datasource's query schema (else they stay raw)."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins

    register_default_plugins()


def test_the_dashboard_matches_grafanas_dashboard_schema() -> None:
    """Decoded with Grafana's own schema types (grafana-foundation-sdk, generated from Grafana's
    dashboard, panel and Prometheus-query schemas) and encoded again: a key the schema does not know
    (a typo, a field of another panel type) is dropped on the way and shows up here."""
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard
    from grafana_foundation_sdk.models.prometheus import Dataquery as PrometheusQuery

    grafana_schema()
    sent = json.loads(DASHBOARD.read_text())
    decoded = Dashboard.from_json(sent)
    kept = json.loads(json.dumps(decoded, cls=JSONEncoder))
    assert differences(sent, kept) == []
    assert not [
        p["type"] for p in sent["panels"] if runtime.panelcfg_config(p["type"]) is None
    ]  # known panel types
    targets = [t for p in (decoded.panels or []) for t in getattr(p, "targets", None) or []]
    assert len(targets) == sum(len(p["targets"]) for p in sent["panels"])
    assert all(isinstance(t, PrometheusQuery) for t in targets)  # every query decoded as a Prometheus query


def test_the_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    grafana_schema()
    sent = json.loads(DASHBOARD.read_text())
    sent["panels"][0]["gridpos"] = sent["panels"][0].pop("gridPos")
    sent["panels"][2]["targets"][0]["legend"] = "{{finetunejob}}"
    kept = json.loads(json.dumps(Dashboard.from_json(sent), cls=JSONEncoder))
    assert differences(sent, kept) == [
        "/panels[0]/gridpos: not in the schema",
        "/panels[2]/targets[0]/legend: not in the schema",
    ]


PROMTOOL = shutil.which("promtool")


def promtool_check(rules: list[dict[str, Any]], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return subprocess.run(
        [PROMTOOL or "promtool", "check", "rules", str(path)], capture_output=True, text=True
    )


# Grafana's variables, as Grafana substitutes them before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$finetunejob": ".*"}


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus; .ci/run installs it)")
def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    exprs = []
    for expr in dashboard_exprs():
        expr = re.sub(r"^label_values\((.*), *\w+\)$", r"\1", expr)  # Grafana's variable query around PromQL
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        exprs.append(expr)
    rules = [{"record": f"kubetune:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    r = promtool_check(rules, tmp_path / "dashboard.rules.yaml")
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr
    broken = promtool_check(
        [{"record": "kubetune:broken", "expr": "sum by (phase (kubetune_finetunejobs)"}], tmp_path / "b.yaml"
    )
    assert broken.returncode != 0  # promtool really parses
