"""Operator scale on the e2e control plane, each figure against the control plane's own speed in the same run.

1. Bare burst: a plain client creates N suspended batch/v1 Jobs (the control plane's speed for the workload
   itself), then deletes them.
2. kubetune burst: the same client POSTs N suspended FineTuneJobs; time from the first POST until the last
   workload Job exists, and per job from its POST returning to its Job appearing (p50/p99). Then all N are
   deleted: time until every FineTuneJob is gone (and until their children are).
3. Steady state (--steady M): M FineTuneJobs that run (1 pod each). The controller manager creates the pods;
   this script plays the kubelet (marks each pod Running with its own loopback IP) and serves each rank 0's
   /progress from a stub HTTP server on that IP (the only thing faked). Measured over --window seconds: operator
   RSS, API requests per minute counted by the apiserver (apiserver_request_total from /metrics, minus this
   script's own), the operator's own count, and how stale status.progress is against the configured interval.

Both sides use the same keep-alive client (the kubernetes package) and the same watch to see objects appear.
Everything else comes from the e2e harness and suite: the control plane (etcd + kube-apiserver +
kube-controller-manager on loopback), the chart's RBAC, the suite's job document, and `kubetune operator` run
as a local process under the chart ServiceAccount's token. Binaries: e2e/harness/build.sh.

    python bench/operator_scale.py --jobs 500 --steady 1000 --out bench/results/operator-scale.json
    python bench/operator_scale.py --jobs 50 --steady 0          # quick
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "e2e"
for extra in (E2E, REPO / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
BARE_NS = "bench-bare"


def suite_module() -> ModuleType:
    """e2e/suite/conftest.py as a plain module: its helpers are what the e2e suite installs and runs."""
    spec = importlib.util.spec_from_file_location("kubetune_e2e_suite", E2E / "suite" / "conftest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(suite: ModuleType, cluster: Any, kctl: Any) -> Path:
    """What the suite's `installed` fixture does: CRD, namespaces, the chart's RBAC; returns the SA kubeconfig."""
    import yaml

    r = kctl("apply", "--server-side", "-f", str(suite.CRD), check=False)
    if r.returncode:
        raise RuntimeError(r.stderr)

    def established(crd: dict[str, Any]) -> bool:
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    cluster.admin.wait_for(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io", established
    )
    for ns in (suite.RELEASE_NS, *suite.NAMESPACES.values(), BARE_NS):
        cluster.create_namespace(ns)
    try:
        docs = suite.render_chart("watchNamespaces={" + ",".join(suite.NAMESPACES.values()) + "}")
    except BaseException as exc:  # no helm binary (pytest.skip raises a BaseException): admin credentials
        print(f"no chart RBAC ({exc}); the operator runs with the admin kubeconfig", flush=True)
        return Path(cluster.kubeconfig)
    runnable = [
        d
        for d in docs
        if d["kind"] != "Deployment" and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})
    ]
    r = kctl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(runnable), check=False)
    if r.returncode:
        raise RuntimeError(r.stderr)
    cluster.wait_for_serviceaccount(suite.RELEASE_NS, suite.SA)
    return Path(cluster.kubeconfig_for_serviceaccount(suite.RELEASE_NS, suite.SA, seconds=6 * 3600))


class Operator:
    """`kubetune operator` as a local process (its flags and KUBETUNE_* settings given here)."""

    def __init__(
        self, kubeconfig: Path, log: Path, namespaces: list[str], poll_interval: float, env: dict[str, str]
    ) -> None:
        from harness.procs import free_port

        self.log, self.port = log, free_port()
        cmd = [str(Path(sys.executable).parent / "kubetune"), "operator", "--poll-interval", str(poll_interval),
               "--log-format", "json", "--liveness", f"http://127.0.0.1:{self.port}/healthz"]  # fmt: skip
        for ns in namespaces:
            cmd += ["-n", ns]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "AWS_"))}
        full_env.update(env, KUBECONFIG=str(kubeconfig))
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        import urllib.request

        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stats(self) -> list[dict[str, int]]:
        """The operator's periodic counters (its `stats:` log lines)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "stats: " in line:
                out.append({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("stats: ", 1)[1])})
        return out

    def errors(self) -> list[str]:
        return [
            ln
            for ln in self.log.read_text(errors="replace").splitlines()
            if '"levelname": "ERROR"' in ln or "Traceback" in ln
        ]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Watcher:
    """A watch on one kind in one namespace: when each object was first and last seen (monotonic)."""

    def __init__(self, list_fn: Any, ns: str, key: Any = None, **kw: Any) -> None:
        self.added: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.key = key or (lambda o: o["metadata"]["name"])
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(list_fn, ns, kw), daemon=True)
        self._thread.start()

    def _run(self, list_fn: Any, ns: str, kw: dict[str, Any]) -> None:
        from kubernetes import watch

        rv = None
        while not self._stop:
            try:
                for ev in watch.Watch().stream(list_fn, ns, timeout_seconds=30, resource_version=rv, **kw):
                    obj = ev["raw_object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    k = self.key(obj)
                    if k is None:
                        continue
                    if ev["type"] == "DELETED":
                        self.deleted.setdefault(k, time.monotonic())
                    elif ev["type"] in ("ADDED", "MODIFIED"):
                        self.added.setdefault(k, time.monotonic())
                    if self._stop:
                        return
            except Exception:  # noqa: BLE001 - a watch that expired: list again
                rv = None
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop = True


def done(resp: Any) -> None:
    """Read the answer: its connection goes back to the pool (an unread one never does: a new TLS connection
    for every request, which is what a keep-alive client avoids)."""
    resp.read()
    resp.release_conn()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def wait(pred: Any, timeout: float, what: str, every: float = 0.1) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic()


def _counter_sums(admin: Any, sample: str, key: Callable[[dict[str, str]], str]) -> dict[str, float]:
    """The apiserver's /metrics counter `sample`, summed per key(labels)."""
    text = admin.call_api(
        "/metrics", "GET", _preload_content=False, _return_http_data_only=True
    ).data.decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(sample + "{"):
            k = key(dict(re.findall(r'(\w+)="([^"]*)"', line)))
            out[k] = out.get(k, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def apiserver_requests(admin: Any) -> dict[str, float]:
    """apiserver_request_total by verb/resource, read from the apiserver's /metrics."""
    return _counter_sums(
        admin,
        "apiserver_request_total",
        lambda labels: (
            f"{labels.get('verb')} {labels.get('resource')}{'/' + labels['subresource'] if labels.get('subresource') else ''}"
        ),
    )


def flow_requests(admin: Any) -> dict[str, float]:
    """Requests the apiserver dispatched per flow schema (API Priority and Fairness): who asked."""
    return _counter_sums(
        admin,
        "apiserver_flowcontrol_dispatched_requests_total",
        lambda labels: labels.get("flow_schema", "?"),
    )


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Where one phase's work went: CPU seconds per process (control plane, operator, this script), the API
    requests the apiserver served (its own counters), and the machine's load average (other sessions share it)."""

    def __init__(self, admin: Any, procs: dict[str, int]) -> None:
        self.admin, self.procs = admin, procs

    def snap(self) -> dict[str, Any]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.procs.items()}
        cpu["bench client"] = sum(os.times()[:2])
        return {"cpu": cpu, "requests": apiserver_requests(self.admin), "t": time.monotonic()}

    def since(self, before: dict[str, Any]) -> dict[str, Any]:
        after = self.snap()
        writes = {k: v for k, v in diff(after["requests"], before["requests"]).items()
                  if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE", "APPLY")}  # fmt: skip
        wall = after["t"] - before["t"]
        return {
            "wall_seconds": round(wall, 2), "load_average_1m": round(os.getloadavg()[0], 2),
            "cpu_seconds": {k: round(v - before["cpu"].get(k, 0.0), 2) for k, v in after["cpu"].items()},
            "apiserver_writes": {k: int(v) for k, v in sorted(writes.items(), key=lambda kv: -kv[1])},
            "apiserver_writes_total": int(sum(writes.values())),
        }  # fmt: skip


# ------------------------------------------------------------------ phases


def bare_burst(api: Any, n: int, timeout: float, meter: Meter) -> dict[str, Any]:
    from kubernetes import client

    batch = client.BatchV1Api(api)
    jobs = Watcher(batch.list_namespaced_job, BARE_NS)
    time.sleep(1)
    doc = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"suspend": True, "template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}  # fmt: skip
    m0 = meter.snap()
    start = time.monotonic()
    for i in range(n):
        done(
            batch.create_namespaced_job(
                BARE_NS, {**doc, "metadata": {"name": f"bare-{i:04d}"}}, _preload_content=False
            )
        )
    posts = time.monotonic() - start
    end = wait(lambda: len(jobs.added) >= n, timeout, "bare Jobs")
    create_meter = meter.since(m0)
    m0 = meter.snap()
    start_del = time.monotonic()
    for i in range(n):
        done(
            batch.delete_namespaced_job(
                f"bare-{i:04d}", BARE_NS, propagation_policy="Background", _preload_content=False
            )
        )
    end_del = wait(lambda: len(jobs.deleted) >= n, timeout, "bare Jobs deleted")
    jobs.stop()
    return {"create_seconds": end - start, "post_seconds": posts, "delete_seconds": end_del - start_del,
            "create_meter": create_meter, "delete_meter": meter.since(m0)}  # fmt: skip


def finetunejob_docs(suite: ModuleType, n: int, prefix: str) -> list[dict[str, Any]]:
    docs = []
    for i in range(n):
        doc = suite.job_doc(f"{prefix}-{i:04d}", FakeS3, FakeS3.data, steps=5, **{"runPolicy.suspend": True})
        doc.update(apiVersion=f"{GROUP}/{VERSION}", kind="FineTuneJob")
        docs.append(doc)
    return docs


def posts_without_operator(api: Any, suite: ModuleType, ns: str, n: int, meter: Meter) -> dict[str, Any]:
    """The API server's own cost of N FineTuneJob POSTs and DELETEs (schema, CEL), no operator running."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    docs = finetunejob_docs(suite, n, "plain")
    m0 = meter.snap()
    start = time.monotonic()
    for doc in docs:
        done(custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc, _preload_content=False))
    posts = time.monotonic() - start
    create_meter = meter.since(m0)
    m0 = meter.snap()
    start = time.monotonic()
    for doc in docs:
        done(
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, doc["metadata"]["name"], _preload_content=False
            )
        )
    return {"post_seconds": posts, "delete_seconds": time.monotonic() - start, "create_meter": create_meter,
            "delete_meter": meter.since(m0)}  # fmt: skip


def profile_summary(path: Path, top: int = 25) -> list[tuple[str, float]]:
    """Share of samples (inclusive) per function in py-spy's collapsed-stack output."""
    totals: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        m = re.match(r"^(.*) (\d+)$", line)
        if not m:
            continue
        stack, n = m.group(1), int(m.group(2))
        samples += n
        for frame in set(stack.split(";")):
            name = re.sub(r" \((.*/)?([^/]+):\d+\)$", r" (\2)", frame)
            totals[name] = totals.get(name, 0) + n
    return [
        (k, round(v / max(samples, 1), 3)) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    ]


def kubetune_burst(
    api: Any, suite: ModuleType, ns: str, n: int, timeout: float, meter: Meter
) -> dict[str, Any]:
    from kubernetes import client
    from kubetune.api.names import LABEL_JOB

    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    jobs = Watcher(
        batch.list_namespaced_job, ns, key=lambda o: (o["metadata"].get("labels") or {}).get(LABEL_JOB)
    )
    ftjs = Watcher(
        lambda ns_, **kw: custom.list_namespaced_custom_object(GROUP, VERSION, ns_, PLURAL, **kw), ns
    )
    time.sleep(1)
    docs = finetunejob_docs(suite, n, "scale")
    names = [d["metadata"]["name"] for d in docs]
    posted: dict[str, float] = {}
    m0 = meter.snap()
    start = time.monotonic()
    for doc in docs:
        done(custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc, _preload_content=False))
        posted[doc["metadata"]["name"]] = time.monotonic()
    posts = time.monotonic() - start
    try:
        end = wait(lambda: all(nm in jobs.added for nm in names), timeout, "workload Jobs", 0.2)
    except TimeoutError:
        end = time.monotonic()
    create_meter = meter.since(m0)
    latencies = [jobs.added[nm] - posted[nm] for nm in names if nm in jobs.added]
    missing = [nm for nm in names if nm not in jobs.added]
    settle = time.monotonic()
    wait(lambda: all(((o.get("status") or {}).get("phase") == "Suspended") for o in json.loads(
        custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False).data)["items"]), timeout, "all Suspended", 1.0)  # fmt: skip
    settle_seconds = time.monotonic() - settle
    time.sleep(5)  # the Events trailing the burst
    m0 = meter.snap()
    start_del = time.monotonic()
    for name in names:
        done(custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, _preload_content=False))
    end_del = wait(lambda: all(nm in ftjs.deleted for nm in names), timeout, "FineTuneJobs deleted", 0.2)
    delete_meter = meter.since(m0)
    end_children = wait(
        lambda: all(nm in jobs.deleted for nm in names if nm in jobs.added), timeout, "children deleted", 0.2
    )
    jobs.stop()
    ftjs.stop()
    return {
        "create_seconds": end - start, "post_seconds": posts, "created": len(latencies), "missing": missing[:10],
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": pct(latencies, 0.99) if latencies else None, "latency_max_s": max(latencies, default=None),
        "delete_seconds": end_del - start_del, "delete_children_seconds": end_children - start_del,
        "all_suspended_after_last_workload_s": settle_seconds, "create_meter": create_meter, "delete_meter": delete_meter,
    }  # fmt: skip


class FakeS3:
    """job_doc and ensure_secret want an S3 server and the suite's data (the `s3_data` fixture's keys); nothing
    here reaches them."""

    bucket, endpoint, access_key, secret_key = "kubetune-bench", "http://127.0.0.1:9", "bench", "bench-secret"
    data = {"model": "s3://kubetune-bench/data/tiny-llama", "train": "s3://kubetune-bench/data/train.jsonl",
            "eval": "s3://kubetune-bench/data/eval.jsonl", "endpoint": endpoint}  # fmt: skip


class ProgressStubs:
    """One /progress endpoint per loopback IP (127.1.x.y:8080), each a trainer that steps once a second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.t0 = time.time()
        self.frozen_step: int | None = None  # freeze(): every trainer stays at this step from now on
        self.reads = 0
        self.served: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self._servers: list[Any] = []
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.reads += 1
            step = self.frozen_step if self.frozen_step is not None else int(time.time() - self.t0)
            body = json.dumps({"step": step, "totalSteps": 1_000_000, "epoch": 0.1, "loss": 1.0 + 1.0 / (1 + step),
                               "learningRate": 1e-4, "tokensPerSecond": 1000.0, "etaSeconds": 3600, "phase": "Training"}).encode()  # fmt: skip
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def freeze(self) -> None:
        """Nothing changes any more: every stub answers with the same step (a fleet at rest)."""
        self.frozen_step = int(time.time() - self.t0)

    def serve(self, ip: str) -> None:
        if ip in self.served:  # the same address again (a new pod there): its stub already answers
            return
        self.served.add(ip)

        async def start() -> None:
            self._servers.append(await asyncio.start_server(self._handle, ip, self.port, reuse_address=True))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)


def job_phases(custom: Any, ns: str) -> dict[str, int]:
    """How many FineTuneJobs of `ns` are in each phase ("-": no status yet)."""
    items = json.loads(
        custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False).data
    )["items"]
    out: dict[str, int] = {}
    for o in items:
        ph = (o.get("status") or {}).get("phase", "-")
        out[ph] = out.get(ph, 0) + 1
    return out


def ip_for(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def steady_state(api: Any, admin_api: Any, suite: ModuleType, op: Operator, ns: str, m: int, window: float, poll: float,
                 timeout: float) -> dict[str, Any]:  # fmt: skip
    from kubernetes import client
    from kubetune.api.names import CONTAINER, LABEL_JOB
    from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    stubs = ProgressStubs(DEFAULT_PROGRESS_PORT)
    assigned: dict[str, str] = {}
    stop = threading.Event()

    def run_pod(pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if (
            name in assigned
            or (pod.get("status") or {}).get("phase") == "Running"
            or pod["metadata"].get("deletionTimestamp")
        ):
            return
        ip = assigned[name] = ip_for(len(assigned))
        stubs.serve(ip)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
                  "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                  "containerStatuses": [{"name": CONTAINER, "ready": True, "restartCount": 0, "image": "bench",
                                         "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}]}  # fmt: skip
        done(core.patch_namespaced_pod_status(name, ns, {"status": status}, _preload_content=False))

    def kubelet() -> None:
        """Mark each new pod Running at its own IP, with its stub serving /progress there (a watch: no lists)."""
        from kubernetes import watch

        rv = None
        while not stop.is_set():
            try:
                for ev in watch.Watch().stream(core.list_namespaced_pod, ns, label_selector=LABEL_JOB, timeout_seconds=30,
                                               resource_version=rv):  # fmt: skip
                    rv = ev["raw_object"]["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        run_pod(ev["raw_object"])
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - an expired watch: list again
                rv = None
                time.sleep(0.5)

    threading.Thread(target=kubelet, daemon=True).start()
    start = time.monotonic()
    for i in range(m):
        doc = suite.job_doc(f"run-{i:04d}", FakeS3, FakeS3.data, steps=1_000_000, **{"distributed.nodes": 1})
        doc.update(apiVersion=f"{GROUP}/{VERSION}", kind="FineTuneJob")
        done(custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc, _preload_content=False))
    print(f"  {m} running FineTuneJobs POSTed in {time.monotonic() - start:.0f}s", flush=True)

    last: dict[str, int] = {}

    def all_running() -> bool:
        nonlocal last
        last = job_phases(custom, ns)
        if int(time.monotonic() - start) % 60 < 10:
            print(f"  {time.monotonic() - start:.0f}s: {last}, load {os.getloadavg()[0]:.1f}", flush=True)
        return last.get("Running", 0) >= m

    try:
        wait(all_running, timeout, f"{m} Running", 10.0)
        note = None
    except TimeoutError:  # measure what does run, and say so
        note = f"not all {m} Running after {timeout:.0f}s; phases then: {last}; measured with those running"
        print(f"  {note}", flush=True)
    ramp = time.monotonic() - start
    print(
        f"  {last.get('Running', 0)} FineTuneJobs Running after {ramp:.0f}s; measuring {window:.0f}s",
        flush=True,
    )
    time.sleep(min(30.0, window / 4))  # settle: the ramp's writes are not steady state
    own_before = op.stats()[-1] if op.stats() else {}
    flows_before = flow_requests(admin_api)
    before = apiserver_requests(admin_api)
    t0 = time.monotonic()
    rss: list[float] = []
    stale: list[float] = []
    bench_requests = 2  # the /metrics reads above
    while time.monotonic() - t0 < window:
        rss.append(op.rss_mib())
        items = json.loads(
            custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False).data
        )["items"]
        bench_requests += 1
        now = datetime.now(timezone.utc)
        for o in items:
            upd = ((o.get("status") or {}).get("progress") or {}).get("updatedAt")
            if upd:
                stale.append((now - datetime.fromisoformat(upd.replace("Z", "+00:00"))).total_seconds())
        time.sleep(10)
    elapsed = time.monotonic() - t0
    after = apiserver_requests(admin_api)
    flows = diff(flow_requests(admin_api), flows_before)
    stop.set()
    time.sleep(1.5)
    per_kind = diff(after, before)
    # The apiserver's own split by client (API Priority and Fairness): the operator runs under the chart's
    # ServiceAccount (flow schema service-accounts), the controller manager's controllers under kube-system's,
    # this script as system:masters (exempt).
    operator_requests = flows.get("service-accounts", 0.0)
    total = sum(per_kind.values()) - bench_requests
    stats = op.stats()
    own = {k: stats[-1][k] - own_before.get(k, 0) for k in stats[-1]} if stats and own_before else {}
    return {
        "jobs": m, "running_at_start_of_window": last.get("Running", 0), "note": note, "ramp_seconds": ramp,
        "window_seconds": elapsed, "poll_interval_s": poll, "load_average_1m_after_window": os.getloadavg()[0],
        "operator_rss_mib_max": max(rss), "operator_rss_mib_mean": statistics.mean(rss),
        "operator_requests_per_min_at_apiserver": operator_requests * 60 / elapsed,
        "apiserver_requests_by_flow_schema_per_min": {k: round(v * 60 / elapsed, 1) for k, v in sorted(flows.items())},
        "apiserver_requests_per_min": total * 60 / elapsed,
        "apiserver_requests_by_kind_per_min": {k: round(v * 60 / elapsed, 1) for k, v in sorted(per_kind.items())},
        "operator_counters_in_window": own, "stub_progress_reads": stubs.reads,
        "progress_staleness_p50_s": statistics.median(stale), "progress_staleness_p99_s": pct(stale, 0.99),
        "progress_staleness_max_s": max(stale),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=500, help="burst size (default 500)")
    ap.add_argument(
        "--steady", type=int, default=0, help="running FineTuneJobs for the steady state (0: skip)"
    )
    ap.add_argument("--window", type=float, default=120, help="steady-state measuring window, seconds")
    ap.add_argument(
        "--poll-interval", type=float, default=10, help="the operator's --poll-interval (default 10)"
    )
    ap.add_argument("--timeout", type=float, default=600, help="give up waiting after this many seconds")
    ap.add_argument(
        "--workdir", help="keep certificates, logs and the operator log here (default: a temporary dir)"
    )
    ap.add_argument(
        "--profile",
        help="py-spy record the operator during the burst into this file (collapsed stacks; "
        "needs py-spy in the venv); the share of samples per function goes into the JSON",
    )
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)

    from harness.cluster import Cluster

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # unwinds the with-blocks: the operator and control plane stop

    signal.signal(signal.SIGTERM, on_term)
    suite = suite_module()
    tmp = tempfile.TemporaryDirectory(prefix="kubetune-opbench-")
    work = Path(a.workdir) if a.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ns = suite.NAMESPACES["many"]
    result: dict[str, Any] = {"jobs": a.jobs, "machine_cpus": os.cpu_count()}
    t0 = time.monotonic()
    with Cluster(work / "cluster") as cluster:
        kctl = suite.Kctl(cluster)
        kubeconfig = install(suite, cluster, kctl)
        suite.ensure_secret(kctl, FakeS3, ns)
        api = cluster.api_client()
        print(f"control plane up and installed ({time.monotonic() - t0:.0f}s)", flush=True)
        meter = Meter(api, {p.name: p.popen.pid for p in cluster.procs})
        result["load_average_1m_at_start"] = os.getloadavg()[0]
        bare = bare_burst(api, a.jobs, a.timeout, meter)
        print(
            f"bare client: {a.jobs} Jobs created in {bare['create_seconds']:.1f}s, deleted in {bare['delete_seconds']:.1f}s",
            flush=True,
        )
        plain = posts_without_operator(api, suite, ns, a.jobs, meter)
        result["finetunejobs_without_operator"] = plain
        print(
            f"no operator: {a.jobs} FineTuneJob POSTs {plain['post_seconds']:.1f}s, DELETEs {plain['delete_seconds']:.1f}s",
            flush=True,
        )
        op = Operator(kubeconfig, work / "operator.log", list(suite.NAMESPACES.values()), a.poll_interval, {})
        try:
            wait(op.healthy, 60, "operator liveness", 0.5)
            meter.procs["operator"] = op.proc.pid
            result["operator_rss_idle_mib"] = op.rss_mib()
            spy = None
            if a.profile:
                pyspy = str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen([pyspy, "record", "--pid", str(op.proc.pid), "--output", a.profile, "--format", "raw",
                                        "--threads", "--rate", "50", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
                time.sleep(2)
            burst = kubetune_burst(api, suite, ns, a.jobs, a.timeout, meter)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                result["profile_top"] = profile_summary(Path(a.profile))
            result["operator_rss_after_burst_mib"] = op.rss_mib()
            result["bare"], result["kubetune"] = bare, burst
            result["create_ratio"] = burst["create_seconds"] / max(bare["create_seconds"], 1e-9)
            result["delete_ratio"] = burst["delete_seconds"] / max(bare["delete_seconds"], 1e-9)
            # What the custom resource alone costs against a Job, no operator: the floor of both ratios here.
            result["create_ratio_without_operator"] = plain["post_seconds"] / max(
                bare["create_seconds"], 1e-9
            )
            result["delete_ratio_without_operator"] = plain["delete_seconds"] / max(
                bare["delete_seconds"], 1e-9
            )
            print(f"kubetune: {burst['created']}/{a.jobs} workloads {burst['create_seconds']:.1f}s after the first POST "
                  f"({result['create_ratio']:.2f}x bare); latency p50 {burst['latency_p50_s']:.2f}s p99 {burst['latency_p99_s']:.2f}s; "
                  f"deleted in {burst['delete_seconds']:.1f}s ({result['delete_ratio']:.2f}x bare), children "
                  f"{burst['delete_children_seconds']:.1f}s", flush=True)  # fmt: skip
            if a.out:  # the burst's figures survive a steady state that fails
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
            if a.steady:
                result["steady"] = steady_state(
                    api, api, suite, op, ns, a.steady, a.window, a.poll_interval, a.timeout
                )
                s = result["steady"]
                print(f"steady state, {a.steady} running: RSS max {s['operator_rss_mib_max']:.0f} MiB; "
                      f"operator {s['operator_requests_per_min_at_apiserver']:.0f} API requests/min at the apiserver "
                      f"(all clients but this script {s['apiserver_requests_per_min']:.0f}); progress staleness "
                      f"p50 {s['progress_staleness_p50_s']:.1f}s p99 {s['progress_staleness_p99_s']:.1f}s "
                      f"(interval {a.poll_interval:g}s)", flush=True)  # fmt: skip
                if a.out:
                    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
            result["operator_log_errors"] = len(op.errors())
        finally:
            op.stop()
    if a.workdir is None:
        tmp.cleanup()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
