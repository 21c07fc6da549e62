"""Suite-only fixtures: the operator installed the way the chart installs it.

* `installed` (session): the CRD from crds/ (server-side apply), the chart rendered with
  `helm template` (ServiceAccount, Roles, bindings applied; the Deployment only server-side
  dry-run, its image cannot run here), watching the suite's fixed namespaces.
* `operator` (session): `kubetune operator` as a local process under the chart
  ServiceAccount's token (TokenRequest kubeconfig), so every call it makes is checked by
  the chart's RBAC. `.restart()`, `.kill()`, `.rss_kib()`, `.healthy()`, `.log`.
* `s3_data` (session): the quickstart's tiny model and data uploaded to the S3 bucket.
* `suite_ns(name)`: one of the watched namespaces, emptied of FineTuneJobs and pods after the
  test (torchrun rank-0s share the host network: one job at a time must hold port 29500).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import binaries
from harness.cluster import RESTRICTED
from harness.mode import NODE_MODE
from harness.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
CHART = ROOT / "charts" / "kubetune"
DATA = ROOT / "examples" / "data"
VENV_BIN = Path(sys.executable).parent
RELEASE_NS = "kubetune-system"
RELEASE = "kubetune"
SA = "kubetune"  # the chart's fullname for release "kubetune"
# The operator watches exactly these (chart value watchNamespaces -> a Role per namespace), so it
# never touches the random namespaces of e2e/test_operator.py, whose tests run their own operator.
NAMESPACES = {
    "happy": "kts-happy",
    "bad": "kts-bad",
    "faults": "kts-faults",
    "many": "kts-many",
    "publish": "kts-publish",
    "queue": "kts-queue",
}
# In the chart's watchNamespaces: the Deployment (real node) watches it; the agent's session operator does not,
# test_ha.py runs its own replicas there.
HA_NAMESPACE = "kts-ha"
# The chart renders with leader election on (its default). With the node agent the Deployment is only
# dry-run (test_ha.py runs replicas as local processes); on the real node it is the suite's operator, with one
# replica so that the other tests see one operator pod (test_ha.py scales it to two and back).
SECRET = "s3-creds"


def helm_binary() -> Path:
    cache = Path(os.environ.get("KUBETUNE_E2E_CACHE", Path.home() / ".cache" / "kubetune-e2e"))
    found = sorted(cache.glob("helm-*/bin/helm"))
    if not found:
        from harness import binaries  # noqa: PLC0415

        try:
            binaries.ensure("helm")
        except binaries.BinariesUnavailable as e:
            pytest.skip(str(e))
        found = sorted(cache.glob("helm-*/bin/helm"))
    return found[-1]


def render_chart(*sets: str) -> list[dict[str, Any]]:
    # The chart's kubeVersion is checked against the e2e cluster's version (helm's offline default is older).
    args = [
        str(helm_binary()),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NS,
        "--kube-version",
        binaries.versions()["KUBERNETES_VERSION"],
    ]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


class Kctl:
    """kubectl + JSON helpers bound to a cluster."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def __call__(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, **kw)

    def get(self, ns: str, kind: str, name: str | None = None, *sel: str) -> Any:
        args = ["-n", ns, "get", kind] + ([name] if name else []) + list(sel) + ["-o", "json"]
        r = self.cluster.kubectl(*args, check=False)
        if r.returncode != 0:
            return None
        obj = json.loads(r.stdout)
        return obj if name else obj["items"]

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return (self.get(ns, "ftj", name) or {}).get("status") or {}

    def phase(self, ns: str, name: str) -> str | None:
        return self.status(ns, name).get("phase")

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Polled: `kubectl wait --for=condition=Established` right after the apply fails at once while the
        new CRD has no status yet (".status.conditions accessor error: <nil>")."""

        def established() -> bool:
            r = self.cluster.kubectl("get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                                     check=False)  # fmt: skip
            return r.returncode == 0 and r.stdout.strip() == "True"

        wait_for(f"{crd} Established", established, timeout)

    def apply(
        self, ns: str, doc: dict[str, Any] | str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        return self.cluster.kubectl("-n", ns, "apply", "-f", "-", input=text, check=check)


@pytest.fixture(scope="session")
def kctl(cluster: Any) -> Kctl:
    return Kctl(cluster)


@pytest.fixture(scope="session")
def installed(cluster: Any, kctl: Kctl) -> dict[str, Any]:
    """CRD + the chart's ServiceAccount/RBAC applied; returns the rendered docs and the SA kubeconfig."""
    t0 = time.monotonic()
    r = kctl("apply", "--server-side", "-f", str(CRD), check=False)
    assert r.returncode == 0, r.stderr
    # kubectl wait fails at once ("accessor error") while the new CRD has no status.conditions yet: ask again.
    wait_for("CRD Established", lambda: kctl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io",
                                             "--timeout=60s", check=False).returncode == 0, 90, 1)  # fmt: skip
    # Every suite namespace enforces Pod Security "restricted": the operator, the trainers and anything else the
    # suite runs there must be admitted under it.
    for ns in (RELEASE_NS, *NAMESPACES.values(), HA_NAMESPACE):
        cluster.create_namespace(ns, RESTRICTED)
    single = ["replicas=1"] if NODE_MODE == "kubelet" else []
    docs = render_chart(
        "watchNamespaces={" + ",".join([*NAMESPACES.values(), HA_NAMESPACE]) + "}",
        "pollInterval=1",
        "logFormat=json",
        *single,
    )
    runnable = [
        d
        for d in docs
        if d["kind"] != "Deployment" and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})
    ]
    deployment = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment, "the chart renders no Deployment"
    r = kctl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(runnable), check=False)
    assert r.returncode == 0, r.stderr
    # With the node agent the operator image cannot run: the API server still validates and admits the
    # Deployment (dry run) and the operator runs as a local process. On the real node it is created.
    dry = [] if NODE_MODE == "kubelet" else ["--dry-run=server"]
    r = kctl("apply", "--server-side", *dry, "-f", "-", input=yaml.safe_dump_all(deployment), check=False)
    assert r.returncode == 0, r.stderr
    cluster.wait_for_serviceaccount(RELEASE_NS, SA)
    kubeconfig = cluster.kubeconfig_for_serviceaccount(RELEASE_NS, SA, seconds=6 * 3600)
    print(f"\n[suite] install: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return {"docs": docs, "deployment": deployment[0], "kubeconfig": kubeconfig}


class Operator:
    """`kubetune operator` as a local process under the chart ServiceAccount's token."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        namespaces: tuple[str, ...] = tuple(NAMESPACES.values()),
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.namespaces, self.args, self.env = namespaces, args, env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        from harness.procs import free_port  # noqa: PLC0415

        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "AWS_"))}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.update(self.env)
        cmd = [
            str(VENV_BIN / "kubetune"),
            "operator",
            "--poll-interval",
            "1",
            "--log-format",
            "json",
            "--liveness",
            f"http://127.0.0.1:{self.port}/healthz",
            *self.args,
        ]
        for ns in self.namespaces:
            cmd += ["-n", ns]
        self.starts += 1
        out = self.log.open("a")
        out.write(f"\n===== start {self.starts} =====\n")
        out.flush()
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for("operator liveness", self.healthy, 60)

    def healthy(self) -> bool:
        import urllib.request  # noqa: PLC0415

        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return self.text()[-n:]

    def errors(self) -> list[str]:
        """Tracebacks / unhandled errors in the log (Kopf logs handler crashes at ERROR)."""
        bad = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"levelname": "ERROR"' in line or "Traceback" in line or '"level": "error"' in line.lower():
                bad.append(line)
        return bad


class DeployedOperator:
    """The chart's Deployment on the real node (KUBETUNE_E2E_NODE=kubelet): the operator image as a pod
    under the chart's ServiceAccount. Same calls as Operator: `kill()` force-deletes the pod (its
    Deployment makes a new one), `stop()` deletes it gracefully, `start()` waits for a Ready pod that
    was not stopped and leads (a standby is Ready too: its pod name is the Lease holder's), `log` holds
    every operator pod's log seen so far (refreshed by `text()`)."""

    def __init__(self, kctl: Kctl, node: Any, deployment: dict[str, Any], log: Path) -> None:
        self.kctl, self.node, self.log = kctl, node, log
        labels = deployment["spec"]["selector"]["matchLabels"]
        self.selector = "-l=" + ",".join(f"{k}={v}" for k, v in labels.items())
        env = {
            e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        self.lease = env.get("KUBETUNE_LEADER_ELECT_LEASE_NAME")  # None without leader election
        self.gone: set[str] = set()  # uids of pods stopped or killed
        self.starts = 0
        self._saved: dict[str, str] = {}  # pod name -> last log read
        log.write_text("")

    def leader(self) -> str | None:
        """The leading pod's name: the Lease's holderIdentity is `<pod name>_<random suffix>`."""
        holder = ((self.kctl.get(RELEASE_NS, "lease", self.lease) or {}).get("spec") or {}).get(
            "holderIdentity"
        )
        return holder.rsplit("_", 1)[0] if holder else None

    def pod(self) -> dict[str, Any] | None:
        """The current operator pod: Ready, not deleting, not one this object stopped, the leader."""
        leader = self.leader() if self.lease else None
        for p in self.kctl.get(RELEASE_NS, "pods", None, self.selector) or []:
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions") or []}
            if (
                p["metadata"]["uid"] not in self.gone
                and not p["metadata"].get("deletionTimestamp")
                and conds.get("Ready") == "True"
                and (self.lease is None or p["metadata"]["name"] == leader)
            ):
                return p
        return None

    def start(self) -> None:
        self.starts += 1
        wait_for("operator pod Ready", lambda: self.pod() is not None, 180, 1)

    def healthy(self) -> bool:
        return self.pod() is not None  # Ready = the readiness probe got 200 from /healthz

    def rss_kib(self) -> int:
        p = self.pod()
        assert p is not None, "no operator pod"
        pid = self.node.task_pid(RELEASE_NS, p["metadata"]["name"])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, grace: int | None = None) -> None:
        p = self.pod()
        if p is None:
            return
        self.text()
        self.gone.add(p["metadata"]["uid"])
        force = ["--grace-period=0", "--force"] if grace == 0 else []
        self.kctl("-n", RELEASE_NS, "delete", "pod", p["metadata"]["name"], "--wait=false", *force)

    def kill(self) -> None:
        self.stop(grace=0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def text(self) -> str:
        for p in self.kctl.get(RELEASE_NS, "pods", None, self.selector) or []:
            name = p["metadata"]["name"]
            r = self.kctl("-n", RELEASE_NS, "logs", name, check=False)
            if r.returncode == 0 and len(r.stdout) >= len(self._saved.get(name, "")):
                self._saved[name] = r.stdout
        text = "".join(f"\n===== pod {k} =====\n{v}" for k, v in self._saved.items())
        self.log.write_text(text)
        return text

    def tail(self, n: int = 6000) -> str:
        return self.text()[-n:]

    def errors(self) -> list[str]:
        return [
            line
            for line in self.text().splitlines()
            if '"levelname": "ERROR"' in line or "Traceback" in line or '"level": "error"' in line.lower()
        ]


@pytest.fixture(scope="session")
def operator(
    request: pytest.FixtureRequest, installed: dict[str, Any], kctl: Kctl, e2e_workdir: Path
) -> Iterator[Operator | DeployedOperator]:
    op: Operator | DeployedOperator
    if NODE_MODE == "kubelet":
        op = DeployedOperator(
            kctl, request.getfixturevalue("node"), installed["deployment"], e2e_workdir / "suite-operator.log"
        )
    else:
        op = Operator(installed["kubeconfig"], e2e_workdir / "suite-operator.log")
    op.start()
    yield op
    op.stop()
    print(f"[suite] operator log: {op.log}", file=sys.stderr)


@pytest.fixture(scope="session")
def s3_data(request: pytest.FixtureRequest, s3: Any) -> dict[str, str]:
    """The tiny model and data in the bucket; returns URIs and `endpoint`, the S3 URL as pods reach it."""
    client = s3.client()
    for p in DATA.rglob("*"):
        if p.is_file() and p.suffix != ".py":
            client.upload_file(str(p), s3.bucket, f"data/{p.relative_to(DATA)}")
    base = f"s3://{s3.bucket}/data"
    endpoint = s3.endpoint
    if NODE_MODE == "kubelet":  # MinIO runs on the host; pods are in the node's network namespace
        endpoint = "http://" + request.getfixturevalue("node").pod_endpoint(
            int(s3.endpoint.rsplit(":", 1)[1])
        )
    return {
        "model": f"{base}/tiny-llama",
        "train": f"{base}/spell-digits/train.jsonl",
        "eval": f"{base}/spell-digits/eval.jsonl",
        "endpoint": endpoint,
    }


def ensure_secret(kctl: Kctl, s3: Any, ns: str) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": ns},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    }
    kctl.apply(ns, doc)


def dump(kctl: Kctl, node: Any, ns: str) -> None:
    """Failure diagnostics: FineTuneJob statuses, pods, and each pod's log tail."""
    for obj in kctl.get(ns, "ftj") or []:
        print(
            f"--- ftj {obj['metadata']['name']} status ---\n" + json.dumps(obj.get("status"), indent=1),
            file=sys.stderr,
        )
    print(kctl("-n", ns, "get", "pods,jobs", "-o", "wide", check=False).stdout, file=sys.stderr)
    if node is None:
        return
    for pod in kctl.get(ns, "pods") or []:
        try:
            print(
                f"--- pod {pod['metadata']['name']} log ---\n"
                + node.logs(ns, pod["metadata"]["name"])[-3000:],
                file=sys.stderr,
            )
        except Exception as e:  # noqa: BLE001
            print(f"--- pod {pod['metadata']['name']}: no log ({e})", file=sys.stderr)


def empty_namespace(kctl: Kctl, ns: str, timeout: float = 150) -> None:
    kctl("-n", ns, "delete", "ftj", "--all", "--wait=false", check=False)
    try:
        wait_for(f"no FineTuneJobs in {ns}", lambda: kctl.get(ns, "ftj") == [], timeout)
    except AssertionError:  # a stuck finalizer must not cascade into the next test
        for obj in kctl.get(ns, "ftj") or []:
            kctl(
                "-n",
                ns,
                "patch",
                "ftj",
                obj["metadata"]["name"],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        raise
    kctl("-n", ns, "delete", "jobs", "--all", "--cascade=foreground", "--wait=false", check=False)
    wait_for(f"no pods in {ns}", lambda: kctl.get(ns, "pods") == [], timeout)


@pytest.fixture
def suite_ns(request: pytest.FixtureRequest, kctl: Kctl, operator: Operator, s3: Any) -> Iterator[str]:
    """The watched namespace for this module (`NS_KEY` in the test module), with the S3 Secret."""
    ns = NAMESPACES[request.module.NS_KEY]
    ensure_secret(kctl, s3, ns)
    empty_namespace(kctl, ns)
    yield ns
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        dump(kctl, request.getfixturevalue("node") if "node" in request.fixturenames else None, ns)
        print("--- operator log tail ---\n" + operator.tail(), file=sys.stderr)
    empty_namespace(kctl, ns)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def job_doc(
    name: str,
    s3: Any,
    data: dict[str, str],
    *,
    example: str = "lora",
    steps: int = 40,
    checkpoint_steps: int = 20,
    **overrides: Any,
) -> dict[str, Any]:
    """A 2 nodes x 1 process CPU job built from examples/cpu-2node-<method>.yaml, shrunk to a few
    steps and pointed at the harness's S3 server (what a user does with `--set`-style edits)."""
    doc = yaml.safe_load((ROOT / "examples" / f"cpu-2node-{example}.yaml").read_text())
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["model"]["source"] = data["model"]
    spec["dataset"].update(train=data["train"], eval=data["eval"])
    spec["training"].update(
        maxSteps=steps,
        perDeviceBatchSize=4,
        globalBatchSize=8,
        warmupSteps=2,
        loggingSteps=1,
        evalSteps=max(steps, 1),
    )
    spec["training"].pop("evalGenerationSamples", None)
    spec["output"].update(uri=f"s3://{s3.bucket}/runs/{name}", checkpointSteps=checkpoint_steps)
    spec["storage"] = {"endpoint": data["endpoint"], "secretRef": {"name": SECRET}}
    spec["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"}}
    # A small scratch emptyDir (its sizeLimit and ephemeral-storage request), as a tiny model needs; 1 GiB of shm.
    spec["scratch"] = {"size": "2Gi"}
    spec["shmSize"] = "1Gi"
    for path, value in overrides.items():  # "training.maxSteps": 5 style
        node = spec
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return doc


def checkpoints(s3: Any, name: str) -> list[int]:
    """The steps of the job's complete checkpoints in S3, oldest first."""
    prefix = f"runs/{name}/checkpoints/"
    resp = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    steps = []
    for o in resp.get("Contents") or []:
        m = re.match(r"step-(\d+)/COMPLETE$", o["Key"][len(prefix) :])
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


KSERVE_CRDS = ("inferenceservices.serving.kserve.io", "servingruntimes.serving.kserve.io")


def install_kserve_crds(kctl: Kctl) -> None:
    """KServe's real CRDs (from its Go module, built by build.sh), applied and Established; skips when absent."""
    try:
        crds = binaries.kserve_crds()
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))
    for path in sorted(
        crds.glob("*.yaml")
    ):  # 1 MB for InferenceService: server-side apply (no annotation copy)
        r = kctl("apply", "--server-side", "--force-conflicts", "-f", str(path), check=False)
        assert r.returncode == 0, r.stderr
    for crd in KSERVE_CRDS:
        kctl.wait_established(crd)
