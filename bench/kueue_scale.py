"""Operator scale behind a real Kueue, each figure against the same Kueue running plain Jobs in the same run.

The control plane and the operator are operator_scale.py's (etcd, kube-apiserver, kube-controller-manager on
loopback; the chart's RBAC; `kubetune operator` as a local process); Kueue is the e2e harness's (the manager
built from its Go module, its release CRDs, RBAC and webhooks: e2e/harness/kueue.py). This script plays the
kubelet: it marks each pod Running at its own loopback IP, serves rank 0's /progress there from a stub, and,
in the queued phases, marks the pod Succeeded after --run-seconds (the only things faked).

1. Bare queue: N batch/v1 Jobs labelled for a LocalQueue whose ClusterQueue admits Q at a time; from the first
   POST until every Job has started (a pod Running) and until every Job is Complete.
2. kubetune queue: N FineTuneJobs through the same queue (each with a coscheduling PodGroup unless
   --no-pod-group); the same two times, the ratio against 1, the apiserver's writes per job by resource, the
   operator's own requests (a FlowSchema of its own, so Kueue's requests are counted apart), the phase changes
   each job went through and the operator's status writes per job, operator CPU and RSS.
3. Steady state (--steady M --running R): the N finished jobs stay; the ClusterQueue grows to R; R FineTuneJobs
   run, and M - N - R more wait in the queue. Over --window seconds: operator RSS, its requests per minute,
   the age of status.progress. Then the stubs stop stepping (nothing changes any more) and, after two poll
   intervals, the operator's requests over another window: at rest it should make none.

    python bench/kueue_scale.py --jobs 500 --quota 50 --steady 5000 --running 1000 --poll-interval 60 --out FILE
    python bench/kueue_scale.py --jobs 6 --quota 2 --steady 0          # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import operator_scale as ops  # noqa: E402 - the shared control plane, operator and meters

GROUP, VERSION, PLURAL = ops.GROUP, ops.VERSION, ops.PLURAL
KUEUE_API = "kueue.x-k8s.io/v1beta2"
QUEUE, CLUSTER_QUEUE = "bench-queue", "bench-cq"
OPERATOR_FLOW = "kubetune-operator"
CPU_M, MEMORY_MI = 100, 256  # what the suite's job document asks per pod (job_doc: 100m, 256Mi)
ADDRESSES = itertools.count()  # each pod of the run its own loopback IP, across every Kubelet below


def queue_docs(ns_list: list[str], jobs: int) -> list[dict[str, Any]]:
    """A flavor, a ClusterQueue with room for `jobs` one-pod jobs (CPU binds), a LocalQueue per namespace."""
    cq = {"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
          "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO", "resourceGroups": [{
              "coveredResources": ["cpu", "memory", "ephemeral-storage"],
              "flavors": [{"name": "default", "resources": quota(jobs)}]}]}}  # fmt: skip
    docs: list[dict[str, Any]] = [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        cq,
    ]
    for ns in ns_list:
        docs.append({"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": QUEUE, "namespace": ns},
                     "spec": {"clusterQueue": CLUSTER_QUEUE}})  # fmt: skip
    return docs


def quota(jobs: int) -> list[dict[str, Any]]:
    return [{"name": "cpu", "nominalQuota": f"{jobs * CPU_M}m"},
            {"name": "memory", "nominalQuota": f"{jobs * MEMORY_MI}Mi"},
            {"name": "ephemeral-storage", "nominalQuota": "100Ti"}]  # fmt: skip


def operator_flow_schema(sa_ns: str, sa: str) -> dict[str, Any]:
    """A FlowSchema matching only the operator's ServiceAccount (ahead of the built-in `service-accounts`,
    which Kueue's ServiceAccount also falls under): the apiserver then counts the operator's requests apart."""
    return {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema", "metadata": {"name": OPERATOR_FLOW},
            "spec": {"matchingPrecedence": 800, "priorityLevelConfiguration": {"name": "workload-low"},
                     "distinguisherMethod": {"type": "ByUser"},
                     "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {"namespace": sa_ns, "name": sa}}],
                                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                   "namespaces": ["*"], "clusterScope": True}],
                                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}}  # fmt: skip


class Kubelet:
    """Plays the kubelet for every pod in one namespace: Running at its own loopback IP (a /progress stub
    there), then Succeeded after `run_seconds` (0: runs until stop()). Watches only; never lists in a loop."""

    def __init__(self, api: Any, ns: str, stubs: ops.ProgressStubs, run_seconds: float) -> None:
        from kubernetes import client

        self.core, self.ns, self.stubs, self.run_seconds = client.CoreV1Api(api), ns, stubs, run_seconds
        self.ips: dict[str, str] = {}
        self.started: dict[str, float] = {}  # pod name -> when marked Running
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        threading.Thread(target=self._finisher, daemon=True).start()

    def _now(self) -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _run(self, pod: dict[str, Any]) -> None:
        from kubetune.api.names import CONTAINER

        name = pod["metadata"]["name"]
        with self.lock:
            if name in self.ips or pod["metadata"].get("deletionTimestamp"):
                return
            ip = self.ips[name] = ops.ip_for(next(ADDRESSES))
        self.stubs.serve(ip)
        now = self._now()
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
                  "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                  "containerStatuses": [{"name": CONTAINER, "ready": True, "restartCount": 0, "image": "bench",
                                         "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}]}  # fmt: skip
        ops.done(
            self.core.patch_namespaced_pod_status(name, self.ns, {"status": status}, _preload_content=False)
        )
        with self.lock:
            self.started[name] = time.monotonic()

    def _succeed(self, name: str) -> None:
        from kubetune.api.names import CONTAINER

        now = self._now()
        term = {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}
        status = {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
                  "containerStatuses": [{"name": CONTAINER, "ready": False, "restartCount": 0, "image": "bench",
                                         "imageID": "", "started": False, "state": {"terminated": term}}]}  # fmt: skip
        ops.done(
            self.core.patch_namespaced_pod_status(name, self.ns, {"status": status}, _preload_content=False)
        )

    def _watch(self) -> None:
        from kubernetes import watch

        rv = None
        while not self._stop.is_set():
            try:
                for ev in watch.Watch().stream(
                    self.core.list_namespaced_pod, self.ns, timeout_seconds=30, resource_version=rv
                ):
                    rv = ev["raw_object"]["metadata"].get("resourceVersion", rv)
                    if ev["type"] == "ADDED":
                        self._run(ev["raw_object"])
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - an expired watch: list again
                rv = None
                time.sleep(0.5)

    def _finisher(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.5)
            if not self.run_seconds:
                continue
            with self.lock:
                due = [
                    n
                    for n, t in self.started.items()
                    if n not in self.finished and time.monotonic() - t >= self.run_seconds
                ]
                self.finished.update(due)
            for name in due:
                try:
                    self._succeed(name)
                except Exception:  # noqa: BLE001 - a pod deleted meanwhile
                    pass

    def stop(self) -> None:
        self._stop.set()


class PhaseWatch:
    """Every FineTuneJob's phase changes as a watch sees them (name -> [phase, ...]) and when each first ran."""

    def __init__(self, custom: Any, ns: str, sample: str = "") -> None:
        self.custom, self.ns = custom, ns
        self.phases: dict[str, list[str]] = {}
        self.status_writes: dict[str, int] = {}
        self._last_status: dict[str, Any] = {}
        self.running_at: dict[str, float] = {}
        self.finished_at: dict[str, float] = {}
        self.sample, self.sample_writes = sample, list[str]()
        self.write_kinds: dict[str, int] = {}
        self._stop = False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        from kubernetes import watch

        rv = None

        def lister(ns_: str, **kw: Any) -> Any:
            return self.custom.list_namespaced_custom_object(GROUP, VERSION, ns_, PLURAL, **kw)

        while not self._stop:
            try:
                for ev in watch.Watch().stream(lister, self.ns, timeout_seconds=30, resource_version=rv):
                    obj = ev["raw_object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    self._see(obj)
                    if self._stop:
                        return
            except Exception:  # noqa: BLE001
                rv = None
                time.sleep(0.2)

    def _see(self, obj: dict[str, Any]) -> None:
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        if status and status != self._last_status.get(name):
            self.status_writes[name] = self.status_writes.get(name, 0) + 1
            prev = self._last_status.get(name) or {}
            changed = sorted(k for k in set(status) | set(prev) if status.get(k) != prev.get(k))
            kind = f"{status.get('phase')}: {','.join(changed)}"
            self.write_kinds[kind] = self.write_kinds.get(kind, 0) + 1  # what the writes changed, all jobs
            if name == self.sample:  # each write of one job, in full
                reasons = ",".join(
                    f"{c.get('type')}={c.get('reason')}" for c in status.get("conditions") or []
                )
                self.sample_writes.append(
                    f"{status.get('phase')} [{reasons}] {status.get('message')!r}: {','.join(changed)}"
                )
            self._last_status[name] = status
        phase = status.get("phase")
        seen = self.phases.setdefault(name, [])
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
            if phase in ("Initializing", "Running", "Succeeded"):  # its pods ran (bare: a pod Running)
                self.running_at.setdefault(name, time.monotonic())
            if phase in ("Succeeded", "Failed"):
                self.finished_at.setdefault(name, time.monotonic())

    def stop(self) -> None:
        self._stop = True


def bare_queue(
    api: Any, ns: str, n: int, kubelet: Kubelet, timeout: float, meter: ops.Meter
) -> dict[str, Any]:
    """N plain batch/v1 Jobs (one pod each, the same requests) through the same LocalQueue: Kueue's own speed."""
    from kubernetes import client

    batch = client.BatchV1Api(api)
    watcher = ops.Watcher(batch.list_namespaced_job, ns, key=lambda o: o["metadata"]["name"] if any(
        c.get("type") == "Complete" and c.get("status") == "True" for c in (o.get("status") or {}).get("conditions") or []) else None)  # fmt: skip
    time.sleep(1)
    resources = {"requests": {"cpu": f"{CPU_M}m", "memory": f"{MEMORY_MI}Mi"}}
    pod = {
        "restartPolicy": "Never",
        "containers": [{"name": "trainer", "image": "bench", "resources": resources}],
    }
    m0 = meter.snap()
    start = time.monotonic()
    names = [f"bare-{i:04d}" for i in range(n)]
    for name in names:
        doc = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": QUEUE}},
               "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": pod}}}  # fmt: skip
        ops.done(batch.create_namespaced_job(ns, doc, _preload_content=False))
    posts = time.monotonic() - start
    end = ops.wait(lambda: all(nm in watcher.added for nm in names), timeout, "bare Jobs Complete", 0.5)
    started = sorted(kubelet.started.values())
    watcher.stop()
    return {"post_seconds": posts, "all_started_seconds": (started[-1] - start) if len(started) >= n else None,
            "all_complete_seconds": end - start, "meter": meter.since(m0)}  # fmt: skip


def kubetune_queue(api: Any, suite: ModuleType, ns: str, n: int, pod_group: bool, timeout: float,
                   meter: ops.Meter) -> dict[str, Any]:  # fmt: skip
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    watch = PhaseWatch(custom, ns, sample="q-0000")
    time.sleep(1)
    extra: dict[str, Any] = {"distributed.nodes": 1}
    if pod_group:
        extra["scheduling"] = {"gang": {"scheduler": "coscheduling"}}
    docs = []
    for i in range(n):
        doc = suite.job_doc(f"q-{i:04d}", ops.FakeS3, ops.FakeS3.data, steps=5, **extra)
        doc.update(apiVersion=f"{GROUP}/{VERSION}", kind="FineTuneJob")
        doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": QUEUE}
        docs.append(doc)
    names = [d["metadata"]["name"] for d in docs]
    m0 = meter.snap()
    start = time.monotonic()
    for doc in docs:
        ops.done(
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc, _preload_content=False)
        )
    posts = time.monotonic() - start
    try:
        end = ops.wait(
            lambda: all(nm in watch.finished_at for nm in names), timeout, "FineTuneJobs finished", 0.5
        )
        note = None
    except TimeoutError as e:
        end, note = time.monotonic(), f"{e}: {ops.job_phases(custom, ns)}"
    m = meter.since(m0)
    watch.stop()
    outcomes: dict[str, int] = {}
    for nm in names:
        last = (watch.phases.get(nm) or ["-"])[-1]
        outcomes[last] = outcomes.get(last, 0) + 1
    changes = [len(watch.phases.get(nm, [])) for nm in names]
    writes = [watch.status_writes.get(nm, 0) for nm in names]
    started = [watch.running_at[nm] for nm in names if nm in watch.running_at]
    paths: dict[str, int] = {}
    for nm in names:
        key = " -> ".join(watch.phases.get(nm, []))
        paths[key] = paths.get(key, 0) + 1
    return {
        "post_seconds": posts, "all_started_seconds": (max(started) - start) if len(started) == n else None,
        "all_finished_seconds": end - start, "outcomes": outcomes, "note": note,
        "phase_paths": dict(sorted(paths.items(), key=lambda kv: -kv[1])),
        "phases_per_job_mean": statistics.mean(changes), "status_writes_seen_per_job_mean": statistics.mean(writes),
        "status_writes_seen_per_job_max": max(writes), "status_writes_of_one_job": watch.sample_writes,
        "status_writes_by_change": dict(sorted(watch.write_kinds.items(), key=lambda kv: -kv[1])), "meter": m,
        "apiserver_writes_per_job": {k: round(v / n, 2) for k, v in m["apiserver_writes"].items()},
    }  # fmt: skip


def operator_requests(admin: Any) -> float:
    return ops.flow_requests(admin).get(OPERATOR_FLOW, 0.0)


def kueue_tried(custom: Any, ns: str) -> int:
    """Workloads of `ns` that Kueue has tried to admit (a QuotaReserved condition, either way)."""
    group, version = KUEUE_API.split("/")
    items = json.loads(
        custom.list_namespaced_custom_object(group, version, ns, "workloads", _preload_content=False).data
    )["items"]
    n = sum(
        1
        for w in items
        if any(c.get("type") == "QuotaReserved" for c in (w.get("status") or {}).get("conditions") or [])
    )
    print(f"  {n} of {len(items)} Workloads tried by Kueue", flush=True)
    return n


def queued_by_kueue(custom: Any, ns: str) -> int:
    """FineTuneJobs of `ns` whose status gives Kueue's reason for their wait (QueuedByKueue)."""
    items = json.loads(
        custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False).data
    )["items"]
    reasons = [{c.get("reason") for c in (o.get("status") or {}).get("conditions") or []} for o in items]
    n = sum(1 for r in reasons if "QueuedByKueue" in r)
    print(f"  {n} of {len(items)} FineTuneJobs queued in Kueue's words", flush=True)
    return n


def audited(log: Path | None, user: str, since: datetime, until: datetime) -> dict[str, int]:
    """Requests `user` made in [since, until), by verb, resource and user agent, from the apiserver's audit log
    (the harness writes one with KUBETUNE_E2E_AUDIT=1); a watch counts once, when its response began."""
    out: dict[str, int] = {}
    if log is None or not log.exists():
        return out
    seen: set[str] = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if (e.get("user") or {}).get("username") != user or e.get("auditID") in seen:
            continue
        at = datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if not since <= at < until:
            continue
        seen.add(e["auditID"])
        ref = e.get("objectRef") or {}
        what = ref.get("resource", e.get("requestURI", "?").split("?")[0])
        if ref.get("subresource"):
            what += "/" + ref["subresource"]
        key = f"{e.get('verb')} {what} ({(e.get('userAgent') or '?').split(' ')[0]})"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def steady(api: Any, suite: ModuleType, op: ops.Operator, ns: str, total: int, running: int, finished: int,
           stubs: ops.ProgressStubs, window: float, poll: float, timeout: float, kctl: Any,
           audit_log: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """`finished` jobs are already there; `running` more run, the rest (total - finished - running) queue."""
    import yaml
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    cq = queue_docs([], running)[1]
    r = kctl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(cq), check=False)
    if r.returncode:
        raise RuntimeError(r.stderr)
    queued = max(0, total - finished - running)
    t0 = time.monotonic()

    def post(prefix: str, count: int) -> None:
        with ThreadPoolExecutor(8) as pool:  # one client at a time took most of the ramp on a busy machine
            list(pool.map(lambda i: post_one(prefix, i), range(count)))

    def post_one(prefix: str, i: int) -> None:
        doc = suite.job_doc(
            f"{prefix}-{i:04d}", ops.FakeS3, ops.FakeS3.data, steps=1_000_000, **{"distributed.nodes": 1}
        )
        doc.update(apiVersion=f"{GROUP}/{VERSION}", kind="FineTuneJob")
        doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": QUEUE}
        ops.done(
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc, _preload_content=False)
        )

    post("run", running)
    print(f"  {running} running FineTuneJobs POSTed in {time.monotonic() - t0:.0f}s", flush=True)
    last: dict[str, int] = {}

    def reached(pred: Any) -> bool:
        nonlocal last
        last = ops.job_phases(custom, ns)
        if int(time.monotonic() - t0) % 60 < 10:
            print(f"  {time.monotonic() - t0:.0f}s: {last}, load {os.getloadavg()[0]:.1f}", flush=True)
        return bool(pred(last))

    ops.wait(lambda: reached(lambda p: p.get("Running", 0) >= running), timeout, f"{running} Running", 10.0)
    ramp = time.monotonic() - t0
    t1 = time.monotonic()
    post("wait", queued)
    ops.wait(lambda: reached(lambda p: p.get("Pending", 0) >= queued), timeout, f"{queued} queued", 10.0)
    # Pending is the operator's first word, before Kueue has a Workload for the Job: the steady state begins
    # when Kueue has made and tried a Workload for every job (on 2 busy cores it makes ~4 a second) and the
    # status of each queued job gives Kueue's words, not while Kueue works through them.
    ops.wait(lambda: kueue_tried(custom, ns) >= running + queued, timeout, "a tried Workload per job", 10.0)
    ops.wait(
        lambda: queued_by_kueue(custom, ns) >= queued, timeout, f"{queued} queued in Kueue's words", 10.0
    )
    queue_ramp = time.monotonic() - t1
    print(
        f"  steady: {last} ({ramp:.0f}s to run, {queue_ramp:.0f}s to queue); measuring {window:.0f}s",
        flush=True,
    )
    time.sleep(min(30.0, window / 4))
    rss: list[float] = []
    stale: list[float] = []
    before = operator_requests(api)
    kinds_before = ops.apiserver_requests(api)
    tw = time.monotonic()
    while time.monotonic() - tw < window:
        rss.append(op.rss_mib())
        items = json.loads(
            custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False).data
        )["items"]
        now = datetime.now(timezone.utc)
        for o in items:
            st = o.get("status") or {}
            upd = (st.get("progress") or {}).get("updatedAt")
            if st.get("phase") == "Running" and upd:
                stale.append((now - datetime.fromisoformat(upd.replace("Z", "+00:00"))).total_seconds())
        time.sleep(10)
    elapsed = time.monotonic() - tw
    per_min = (operator_requests(api) - before) * 60 / elapsed
    kinds = {
        k: round(v * 60 / elapsed, 1)
        for k, v in sorted(ops.diff(ops.apiserver_requests(api), kinds_before).items())
    }
    # At rest: every stub keeps answering with the same step, so nothing the operator reads changes.
    stubs.freeze()
    time.sleep(2 * poll + 15)
    rest_before = operator_requests(api)
    rest_since = datetime.now(timezone.utc)
    tr = time.monotonic()
    rest_rss = []
    while time.monotonic() - tr < window:
        rest_rss.append(op.rss_mib())
        time.sleep(5)
    rest_elapsed = time.monotonic() - tr
    rest = operator_requests(api) - rest_before
    user = f"system:serviceaccount:{suite.RELEASE_NS}:{suite.SA}"
    rest_audited = audited(audit_log, user, rest_since, datetime.now(timezone.utc))
    return {
        "total": total, "running": running, "finished": finished, "queued": queued, "phases": last,
        "ramp_running_seconds": ramp, "ramp_queued_seconds": queue_ramp, "window_seconds": elapsed,
        "poll_interval_s": poll, "progress_budget_reads_per_s": float(os.environ.get("KUBETUNE_PROGRESS_BUDGET", "100")),
        "operator_rss_mib_max": max(rss + rest_rss), "operator_rss_mib_mean": statistics.mean(rss),
        "operator_requests_per_min": per_min, "apiserver_requests_by_kind_per_min": kinds,
        "progress_age_p50_s": statistics.median(stale) if stale else None,
        "progress_age_p99_s": ops.pct(stale, 0.99) if stale else None, "progress_age_max_s": max(stale, default=None),
        "at_rest_window_seconds": rest_elapsed, "operator_requests_at_rest": rest,
        "operator_requests_at_rest_audited": rest_audited,
        "load_average_1m_after": os.getloadavg()[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=500, help="jobs through the queue, both sides (default 500)")
    ap.add_argument(
        "--quota", type=int, default=50, help="jobs the ClusterQueue admits at a time (default 50)"
    )
    ap.add_argument(
        "--run-seconds", type=float, default=5, help="how long each queued job's pod runs (default 5)"
    )
    ap.add_argument("--no-pod-group", action="store_true", help="no coscheduling PodGroup per FineTuneJob")
    ap.add_argument(
        "--steady", type=int, default=0, help="FineTuneJobs in the steady state, all told (0: skip)"
    )
    ap.add_argument(
        "--steady-only",
        action="store_true",
        help="skip the queue phases: the steady state alone (none finished)",
    )
    ap.add_argument("--running", type=int, default=1000, help="of those, running (default 1000)")
    ap.add_argument("--window", type=float, default=120, help="measuring windows, seconds")
    ap.add_argument(
        "--poll-interval", type=float, default=10, help="the operator's --poll-interval (default 10)"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="give up waiting after this many seconds")
    ap.add_argument("--workdir", help="keep logs here (default: a temporary dir)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)

    import yaml
    from harness import binaries
    from harness.cluster import Cluster
    from harness.kueue import Kueue

    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(f"signal {s}")))
    suite = ops.suite_module()
    tmp = tempfile.TemporaryDirectory(prefix="kubetune-kueuebench-")
    work = Path(a.workdir) if a.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ns, bare_ns = suite.NAMESPACES["many"], ops.BARE_NS
    result: dict[str, Any] = {"jobs": a.jobs, "quota": a.quota, "run_seconds": a.run_seconds, "machine_cpus": os.cpu_count(),
                              "pod_group": not a.no_pod_group, "load_average_1m_at_start": os.getloadavg()[0]}  # fmt: skip

    def save() -> None:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    binaries.ensure("kueue")
    os.environ.setdefault("KUBETUNE_E2E_AUDIT", "1")  # the apiserver's audit log attributes requests at rest
    t0 = time.monotonic()
    with Cluster(work / "cluster") as cluster, Kueue(cluster, work / "kueue") as kueue:
        kctl = suite.Kctl(cluster)
        kubeconfig = ops.install(suite, cluster, kctl)
        suite.ensure_secret(kctl, ops.FakeS3, ns)
        if not a.no_pod_group:
            kctl("apply", "--server-side", "-f", str(ops.E2E / "crds" / "coscheduling"))
        docs = [*queue_docs([ns, bare_ns], a.quota), operator_flow_schema(suite.RELEASE_NS, suite.SA)]
        r = kctl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
        if r.returncode:
            raise RuntimeError(r.stderr)
        api = cluster.api_client()
        print(f"control plane, Kueue and queues up ({time.monotonic() - t0:.0f}s)", flush=True)
        assert kueue.proc is not None
        meter = ops.Meter(
            api, {**{p.name: p.popen.pid for p in cluster.procs}, "kueue": kueue.proc.popen.pid}
        )
        from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT

        stubs = ops.ProgressStubs(DEFAULT_PROGRESS_PORT)
        if not a.steady_only:
            bare_kubelet = Kubelet(api, bare_ns, stubs, a.run_seconds)
            result["bare"] = bare = bare_queue(api, bare_ns, a.jobs, bare_kubelet, a.timeout, meter)
            bare_kubelet.stop()
            print(f"bare: {a.jobs} Jobs through Kueue ({a.quota} at a time): all started {bare['all_started_seconds']:.1f}s, "
                  f"all Complete {bare['all_complete_seconds']:.1f}s", flush=True)  # fmt: skip
            save()
        op = ops.Operator(
            kubeconfig, work / "operator.log", list(suite.NAMESPACES.values()), a.poll_interval, {}
        )
        try:
            ops.wait(op.healthy, 60, "operator liveness", 0.5)
            meter.procs["operator"] = op.proc.pid
            result["operator_rss_idle_mib"] = op.rss_mib()
            if not a.steady_only:
                kubelet = Kubelet(api, ns, stubs, a.run_seconds)
                flow0 = operator_requests(api)
                result["kubetune"] = kt = kubetune_queue(
                    api, suite, ns, a.jobs, not a.no_pod_group, a.timeout, meter
                )
                kt["operator_requests"] = operator_requests(api) - flow0
                kt["operator_requests_per_job"] = kt["operator_requests"] / a.jobs
                result["operator_rss_after_queue_mib"] = op.rss_mib()
                for k in ("all_started_seconds", "all_finished_seconds"):
                    b = bare["all_started_seconds" if k == "all_started_seconds" else "all_complete_seconds"]
                    result[k.replace("_seconds", "_ratio")] = (kt[k] / b) if kt[k] and b else None
                print(f"kubetune: {a.jobs} FineTuneJobs through Kueue: all started {kt['all_started_seconds'] or float('nan'):.1f}s "
                      f"({result['all_started_ratio'] or float('nan'):.2f}x bare), all finished {kt['all_finished_seconds']:.1f}s "
                      f"({result['all_finished_ratio'] or float('nan'):.2f}x bare); outcomes {kt['outcomes']}; "
                      f"{kt['operator_requests_per_job']:.1f} operator requests/job; phases/job {kt['phases_per_job_mean']:.1f}, "
                      f"status writes seen/job {kt['status_writes_seen_per_job_mean']:.1f}", flush=True)  # fmt: skip
                save()
                kubelet.stop()
            if a.steady:
                finished = 0 if a.steady_only else a.jobs
                kubelet = Kubelet(api, ns, stubs, 0)
                result["steady"] = s = steady(api, suite, op, ns, a.steady, a.running, finished, stubs, a.window,
                                              a.poll_interval, a.timeout, kctl, cluster.audit_log)  # fmt: skip
                kubelet.stop()
                print(f"steady {a.steady}: RSS max {s['operator_rss_mib_max']:.0f} MiB; operator {s['operator_requests_per_min']:.0f} "
                      f"requests/min; progress age p99 {s['progress_age_p99_s'] or float('nan'):.1f}s (interval {a.poll_interval:g}s); "
                      f"at rest {s['operator_requests_at_rest']:.0f} requests in {s['at_rest_window_seconds']:.0f}s: "
                      f"{s['operator_requests_at_rest_audited']}", flush=True)  # fmt: skip
            result["operator_log_errors"] = len(op.errors())
            result["kueue_errors"] = kueue.errors()[:20]
        finally:
            op.stop()
            save()
    if a.workdir is None:
        tmp.cleanup()
    save()
    return result


if __name__ == "__main__":
    main()
