"""Operator scale: apply N FineTuneJobs (suspended: no pods, no training) and time until each one's workload
(the batch/v1 Job) exists; report p50/p95/max latency, the time until all exist, and the operator's RSS.

Everything comes from the e2e harness: the control plane (e2e/harness/cluster.py: etcd + kube-apiserver +
kube-controller-manager on loopback), and from the e2e suite (e2e/suite/conftest.py) the chart's RBAC
(`render_chart`), the FineTuneJob document (`job_doc`, the suite's CPU job) and `kubetune operator` run as a local
process under the chart ServiceAccount's token (`Operator`, watching the suite's namespaces, poll interval 1 s).
The jobs go to the suite's `kts-many` namespace. The harness binaries must be built (e2e/harness/build.sh; set
KUBETUNE_E2E_BUILD=0 to fail instead of building).

    python bench/operator_scale.py --jobs 50
    python bench/operator_scale.py --jobs 200 --out bench/results/operator-scale.json

Latency per job = (first poll that sees its Job) - (its FineTuneJob POST returned); jobs are POSTed back to back
through the API (no kubectl start-up per job), and the Jobs are polled every --poll seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "e2e"
for extra in (E2E, REPO / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def suite_module() -> ModuleType:
    """e2e/suite/conftest.py as a plain module: its helpers are what the e2e suite installs and runs."""
    spec = importlib.util.spec_from_file_location("kubetune_e2e_suite", E2E / "suite" / "conftest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(suite: ModuleType, cluster: Any, kctl: Any) -> Path:
    """What the suite's `installed` fixture does: CRD, namespaces, the chart's RBAC; returns the SA kubeconfig."""
    r = kctl("apply", "--server-side", "-f", str(suite.CRD), check=False)
    if r.returncode:
        raise RuntimeError(r.stderr)
    kctl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    for ns in (suite.RELEASE_NS, *suite.NAMESPACES.values()):
        cluster.create_namespace(ns)
    docs = suite.render_chart("watchNamespaces={" + ",".join(suite.NAMESPACES.values()) + "}", "pollInterval=1")
    runnable = [d for d in docs if d["kind"] != "Deployment" and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    import yaml

    r = kctl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(runnable), check=False)
    if r.returncode:
        raise RuntimeError(r.stderr)
    cluster.wait_for_serviceaccount(suite.RELEASE_NS, suite.SA)
    return Path(cluster.kubeconfig_for_serviceaccount(suite.RELEASE_NS, suite.SA, seconds=6 * 3600))


class FakeS3:
    """job_doc and ensure_secret want an S3 server; suspended jobs never reach it."""

    bucket, endpoint, access_key, secret_key = "kubetune-bench", "http://127.0.0.1:9", "bench", "bench-secret"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between Job listings (default 0.2)")
    ap.add_argument("--timeout", type=float, default=300, help="give up waiting for workloads after this many seconds (default 300)")
    ap.add_argument("--workdir", help="keep certificates, logs and the operator log here (default: a temporary dir)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)

    import signal

    from harness.cluster import Cluster
    from kubetune.render.objects import LABEL_JOB

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # unwinds the with-blocks: the operator and control plane stop

    signal.signal(signal.SIGTERM, on_term)

    suite = suite_module()
    tmp = tempfile.TemporaryDirectory(prefix="kubetune-opbench-")
    work = Path(a.workdir) if a.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ns = suite.NAMESPACES["many"]
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    with Cluster(work / "cluster") as cluster:
        kctl = suite.Kctl(cluster)
        print(f"control plane up ({time.monotonic() - t0:.0f}s); installing CRD + chart RBAC", flush=True)
        kubeconfig = install(suite, cluster, kctl)
        suite.ensure_secret(kctl, FakeS3, ns)
        op = suite.Operator(kubeconfig, work / "operator.log")
        op.start()
        setup_s = time.monotonic() - t0
        print(f"operator healthy ({setup_s:.0f}s); applying {a.jobs} FineTuneJobs", flush=True)
        rss_idle = op.rss_kib()
        peak = [rss_idle]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.wait(0.1):
                try:
                    peak[0] = max(peak[0], op.rss_kib())
                except (OSError, AssertionError):
                    return

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            names = [f"scale-{i:04d}" for i in range(a.jobs)]
            data = {"model": f"s3://{FakeS3.bucket}/data/tiny-llama", "train": f"s3://{FakeS3.bucket}/data/train.jsonl",
                    "eval": f"s3://{FakeS3.bucket}/data/eval.jsonl"}  # fmt: skip
            created: dict[str, float] = {}
            seen: dict[str, float] = {}
            path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"

            def poll_jobs() -> None:
                while not stop.is_set() and len(seen) < len(names):
                    items = cluster.admin.get(f"/apis/batch/v1/namespaces/{ns}/jobs").get("items", [])
                    now = time.monotonic()
                    for job in items:
                        owner = (job["metadata"].get("labels") or {}).get(LABEL_JOB) or job["metadata"]["name"].rsplit("-r", 1)[0]
                        if owner in created and owner not in seen:
                            seen[owner] = now
                    time.sleep(a.poll)

            poller = threading.Thread(target=poll_jobs, daemon=True)
            poller.start()
            start = time.monotonic()
            for name in names:
                doc = suite.job_doc(name, FakeS3, data, steps=5, **{"runPolicy.suspend": True})
                doc.setdefault("apiVersion", "kubetune.io/v1alpha1")
                doc.setdefault("kind", "FineTuneJob")
                cluster.admin.post(path, doc)
                created[name] = time.monotonic()
            applied_s = time.monotonic() - start
            deadline = start + a.timeout
            while len(seen) < len(names) and time.monotonic() < deadline:
                if not op.healthy():
                    raise RuntimeError("operator died:\n" + op.tail())
                time.sleep(0.2)
            all_s = time.monotonic() - start
            missing = sorted(set(names) - set(seen))
            latencies = [seen[n] - created[n] for n in names if n in seen]
            rss_after = op.rss_kib()
            # Then delete them all: until every FineTuneJob is gone (the operator's finalizer released).
            start_delete = time.monotonic()
            for name in names:
                cluster.admin.delete(f"{path}/{name}")
            while cluster.admin.get(path).get("items") and time.monotonic() < start_delete + a.timeout:
                time.sleep(0.2)
            delete_s = time.monotonic() - start_delete
            left = len(cluster.admin.get(path).get("items") or [])
        finally:
            stop.set()
            sampler.join(2)
            errors = op.errors()
            op.stop()
        if not latencies:
            raise RuntimeError(f"no workload Job appeared in {a.timeout:.0f}s; operator log tail:\n{op.tail()}")
        result = {
            "jobs": a.jobs, "created_workloads": len(latencies), "missing": missing[:20],
            "apply_seconds": applied_s, "all_workloads_seconds": all_s,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": pct(latencies, 0.95), "latency_max_s": max(latencies),
            "operator_rss_idle_mib": rss_idle / 1024, "operator_rss_peak_mib": peak[0] / 1024, "operator_rss_after_mib": rss_after / 1024,
            "operator_log_errors": len(errors), "setup_seconds": setup_s, "poll_interval_s": a.poll,
            "delete_all_seconds": delete_s, "not_deleted": left,
        }  # fmt: skip
    tmp.cleanup() if not a.workdir else None
    print(f"{a.jobs} FineTuneJobs (suspended) in {ns}: {len(latencies)} workloads, all within {all_s:.1f}s (POSTs took {applied_s:.1f}s)")
    print(f"latency to workload Job: p50 {result['latency_p50_s']:.2f}s  p95 {result['latency_p95_s']:.2f}s  max {result['latency_max_s']:.2f}s")
    print(f"operator RSS: idle {result['operator_rss_idle_mib']:.0f} MiB, peak {result['operator_rss_peak_mib']:.0f} MiB, "
          f"after {result['operator_rss_after_mib']:.0f} MiB; {len(errors)} error lines in its log")  # fmt: skip
    print(f"deleting all {a.jobs}: every FineTuneJob gone after {delete_s:.1f}s" + (f" ({left} LEFT)" if left else ""))
    if missing:
        print(f"MISSING workloads: {len(missing)} (first: {missing[:5]})")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
