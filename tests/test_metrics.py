"""The operator's Prometheus metrics: what each watch event does to them, and that the dashboard and
docs/operator.md name exactly what a scrape exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from kubetune.handlers.metrics import Metrics, api_call
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ftj(phase: str | None = None, step: int | None = None, loss: float | None = None, restarts: int = 0,
        reason: str | None = None, name: str = "demo", gpus: int = 0) -> dict[str, Any]:
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


def test_jobs_are_counted_by_phase_and_forgotten_when_deleted(metrics: tuple[Metrics, CollectorRegistry]) -> None:
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


def test_training_metrics_are_reexported_per_job_from_status_progress(metrics: tuple[Metrics, CollectorRegistry]) -> None:
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


def test_first_progress_latency_is_measured_once_and_only_when_seen_arriving(metrics: tuple[Metrics, CollectorRegistry]) -> None:
    m, reg = metrics
    m.observe("ADDED", ftj("Initializing"), T0 + 5)
    m.observe("MODIFIED", ftj("Running", step=1, loss=3.0), T0 + 12)
    m.observe("MODIFIED", ftj("Running", step=2, loss=2.0), T0 + 14)
    m.observe("ADDED", ftj("Running", step=50, loss=1.0, name="old"), T0 + 999)  # already running when we started
    s = scrape(m, reg)
    assert s[("kubetune_time_to_first_progress_seconds_count", ())] == 1
    assert s[("kubetune_time_to_first_progress_seconds_sum", ())] == 12


def test_gang_restarts_are_counted_by_the_failed_ranks_reason(metrics: tuple[Metrics, CollectorRegistry]) -> None:
    m, reg = metrics
    m.observe("ADDED", ftj("Running", restarts=1, reason="Preempted"), T0)  # restarts before this process: not counted
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
    assert {s.name: s.value for f in m.collect(now=T0 + 510) for s in f.samples if f.name == "kubetune_gpu_seconds"} == {
        "kubetune_gpu_seconds_total": 16 * 100 + 16 * 10}


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
    return {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


def test_the_dashboard_is_valid_json_and_uses_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    used = {name for e in exprs for name in re.findall(r"\bkubetune_[a-z_]+", e)}
    assert len(dash["panels"]) >= 10 and len(used) >= 15
    assert used <= exposed_names(), f"not exported: {sorted(used - exposed_names())}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented() -> None:
    docs = (ROOT / "docs" / "operator.md").read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if "seconds_" in n else n for n in exposed_names()}
    kubetune = {n for n in families if n.startswith("kubetune_")}
    assert len(kubetune) >= 18
    assert not [n for n in sorted(kubetune) if f"`{n}`" not in docs]
