"""Item 5: 50 FineTuneJobs applied at once (one `kubectl apply`) all reach their expected phase:
45 valid ones held with `spec.runPolicy.suspend: true` (the Kueue path: the operator creates only a
suspended Job; no pods, no ConfigMap or Service yet) -> Suspended, 5 the operator refuses -> Failed.
Then two are admitted, one by its spec and one as Kueue does (unsuspending the Job): each gets its
ConfigMap and Service. Prints the operator's RSS and the apply -> workload-created latency (p50/p95)."""

from __future__ import annotations

import statistics
import sys
import threading
import time

import pytest
import yaml
from conftest import job_doc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "many"
N, N_BAD = 50, 5


def test_fifty_jobs_at_once(cluster, kctl, suite_ns, s3, s3_data, operator):
    docs = []
    for i in range(N):
        name = f"many-{i:02d}"
        if i < N_BAD:
            doc = job_doc(name, s3, s3_data, steps=5, **{"dataset.eval": None, "training.evalSteps": 5})
        else:  # (pods of an admitted job stay Pending: no node has that label)
            doc = job_doc(
                name,
                s3,
                s3_data,
                steps=5,
                **{"runPolicy.suspend": True, "nodeSelector": {"kubetune.io/e2e": "nowhere"}},
            )
        docs.append(doc)
    rss_before = operator.rss_kib()

    seen: dict[str, float] = {}  # FineTuneJob name -> when its Job was first seen
    created: dict[str, float] = {}  # FineTuneJob name -> when it was first seen itself
    stop = threading.Event()
    jobs_path = f"/apis/batch/v1/namespaces/{suite_ns}/jobs"
    ftj_path = f"/apis/kubetune.io/v1alpha1/namespaces/{suite_ns}/finetunejobs"

    def watch_jobs() -> None:
        while not stop.is_set():
            try:
                ftjs = cluster.admin.get(ftj_path).get("items") or []
                items = cluster.admin.get(jobs_path).get("items") or []
            except Exception:  # noqa: BLE001
                ftjs, items = [], []
            now = time.monotonic()
            for f in ftjs:
                created.setdefault(f["metadata"]["name"], now)
            for j in items:
                seen.setdefault(j["metadata"]["name"].removesuffix("-r0"), now)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    kctl.apply(suite_ns, yaml.safe_dump_all(docs))
    t_applied = time.monotonic() - t0
    try:
        wait_for(f"{N - N_BAD} workloads", lambda: len(seen) >= N - N_BAD, 180, 1)

        def phases() -> dict[str, int]:
            out: dict[str, int] = {}
            for o in kctl.get(suite_ns, "ftj") or []:
                ph = (o.get("status") or {}).get("phase", "-")
                out[ph] = out.get(ph, 0) + 1
            return out

        wait_for("all phases", lambda: phases() == {"Suspended": N - N_BAD, "Failed": N_BAD}, 240, 2)
        t_all = time.monotonic() - t0
    finally:
        stop.set()
        watcher.join(5)
    rss_after = operator.rss_kib()

    def pct(xs: list[float]) -> str:
        xs = sorted(xs)
        p95 = xs[min(len(xs) - 1, int(round(0.95 * len(xs))) - 1)]
        return f"p50 {statistics.median(xs):.2f}s p95 {p95:.2f}s max {xs[-1]:.2f}s"

    from_apply = [seen[n] - t0 for n in seen]
    from_object = [seen[n] - created.get(n, t0) for n in seen]  # 0.2 s polling resolution
    print(
        f"\n[suite] {N} jobs: kubectl apply took {t_applied:.1f}s; start of apply -> Job created {pct(from_apply)}; "
        f"FineTuneJob visible -> its Job created {pct(from_object)}; all phases reached {t_all:.1f}s; "
        f"operator RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB",
        file=sys.stderr,
    )
    # Nothing ran: no pods for suspended or refused jobs; refused ones have no workload at all.
    assert kctl.get(suite_ns, "pods") == []
    assert not any(f"many-{i:02d}" in seen for i in range(N_BAD))
    jobs = kctl.get(suite_ns, "jobs")
    assert len(jobs) == N - N_BAD and all(j["spec"]["suspend"] is True for j in jobs)
    assert operator.healthy()
    assert rss_after < 1024 * 1024, rss_after  # < 1 GiB (the chart's limit is 512Mi: report, not gate)
    managed = ("-l", "app.kubernetes.io/managed-by=kubetune")
    assert (
        kctl.get(suite_ns, "configmaps", None, *managed) == []
        and kctl.get(suite_ns, "services", None, *managed) == []
    )
    assert all(j["metadata"]["annotations"].get("kubetune.io/deferred") == "ConfigMap,Service" for j in jobs)

    # Admission creates what a queued job was created without: by its spec (the operator resumes the Job
    # after creating them) and by a queue unsuspending the Job itself (the operator follows).
    kctl(
        "-n",
        suite_ns,
        "patch",
        "ftj",
        "many-05",
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":false}}}',
    )
    kctl("-n", suite_ns, "patch", "job", "many-06-r0", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    for name in ("many-05", "many-06"):

        def admitted(name: str = name) -> bool:
            job = kctl.get(suite_ns, "job", f"{name}-r0") or {}
            return (kctl.get(suite_ns, "configmap", f"{name}-config") is not None and kctl.get(suite_ns, "service", name) is not None
                    and job["spec"]["suspend"] is False and "kubetune.io/deferred" not in job["metadata"]["annotations"])  # fmt: skip

        wait_for(f"{name} admitted with its ConfigMap and Service", admitted, 60, 1)
    assert (
        kctl.get(suite_ns, "job", "many-06-r0")["metadata"]["annotations"]["kubetune.io/suspend"] == "true"
    )  # not fought
    assert (
        kctl.phase(suite_ns, "many-07") == "Suspended"
        and kctl.get(suite_ns, "configmap", "many-07-config") is None
    )

    # `kubectl delete ftj --all`: the operator's finalizer (Kopf's, for its status timer) must come off
    # every object, and the garbage collector then removes each Job, Service and ConfigMap.
    t0 = time.monotonic()
    r = kctl("-n", suite_ns, "delete", "ftj", "--all", "--wait=false", check=False)
    assert r.returncode == 0, r.stderr
    wait_for("every FineTuneJob gone", lambda: kctl.get(suite_ns, "ftj") == [], 180, 1)
    t_ftj = time.monotonic() - t0
    wait_for(
        "every child gone",
        lambda: (
            kctl.get(suite_ns, "jobs") == []
            and kctl.get(suite_ns, "configmaps", None, "-l", "app.kubernetes.io/managed-by=kubetune") == []
        ),
        180,
        1,
    )
    print(
        f"[suite] delete {N} jobs: FineTuneJobs gone after {t_ftj:.1f}s, children after {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    assert operator.healthy()
