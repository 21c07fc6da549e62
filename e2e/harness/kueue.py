"""Kueue's manager beside the API server: its CRDs, its ClusterRole, its webhooks, its controllers.

    with Kueue(cluster, workdir / "kueue") as kueue:
        cluster.apply(kueue_queues_yaml)       # ResourceFlavor, ClusterQueue, LocalQueue

The manager is `sigs.k8s.io/kueue/cmd/kueue` built by build.sh (`kueue` component) from the pinned module;
the CRDs, the manager's ClusterRole and the webhook configurations are the release's own files from the same
module zip (config/components/...), not hand-written copies. What differs from `kubectl apply` of Kueue's
release manifests, and why:

* it runs as a process beside the API server (inside the node's network + mount namespace on the real node,
  on the host's loopback with the node agent), not as a pod: its webhook server must be reachable from the
  API server, and this cluster has no kube-proxy to route a Service's ClusterIP. The webhook configurations
  therefore point at `https://127.0.0.1:<port>/<path>` (clientConfig.url) instead of the
  `kueue-webhook-service` Service;
* internal cert management is off: the serving certificate (SAN 127.0.0.1) comes from the harness's CA, which
  is also the webhooks' caBundle. Kueue then reads its metrics certificate from the fixed path
  /etc/kueue/metrics/certs, so the process gets its own mount namespace with an overlay on /etc holding that
  directory (the host's /etc is never written);
* it talks to the API server as the ServiceAccount kueue-system/kueue-controller-manager under the release's
  ClusterRole (token kubeconfig), so it has exactly the permissions a cluster install gives it;
* only the batch/v1 Job integration is enabled, and only the webhooks for it and for Kueue's own kinds are
  installed: the release also installs Pod/Deployment/StatefulSet webhooks (failurePolicy Fail) for the
  integrations the suite does not use, which would put every pod creation of the rest of the session behind
  this process; leader election is off (one replica); the on-demand visibility API server is off.
"""

from __future__ import annotations

import base64
import json
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from . import binaries
from .kube import ApiError
from .procs import Proc, StartStop, free_port

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
CLUSTER_ROLE = "kueue-manager-role"
WEBHOOKS = {"MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
            "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration"}  # fmt: skip
API = "kueue.x-k8s.io/v1beta2"
EXPECTED_ERRORS = (
    "Provisioning Requests not supported",
    "not found",
    "Failed to add localQueue to the cache: queue already exists",
)
"""Errors Kueue logs in a healthy cluster: no cluster-autoscaler (ProvisioningRequest checks skipped); an
object deleted while a reconcile of it ran (a gang restart deletes its Job while Kueue may be admitting it); and a
LocalQueue's create event handled after its ClusterQueue's (the ClusterQueue's entry in Kueue's cache takes the
LocalQueues that exist then, so the LocalQueue's own event finds itself there: logged at error level, the cache
is right; seen once, in a cold CI run at load, when the module created both at once)."""


def served_here(webhook: dict[str, Any]) -> bool:
    """The webhooks this install keeps: Kueue's own kinds and batch/v1 Jobs (the one integration enabled)."""
    for rule in webhook.get("rules") or []:
        groups, resources = set(rule.get("apiGroups") or []), set(rule.get("resources") or [])
        if "kueue.x-k8s.io" in groups or (groups == {"batch"} and resources == {"jobs"}):
            return True
    return False


def webhook_configurations(release: str, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """The release's webhook configurations (config/components/webhook/manifests.yaml), pointed at the manager's
    address instead of its Service, trimmed to `served_here`."""
    docs = [d for d in yaml.safe_load_all(release) if d]
    out = []
    for doc in docs:
        kind = doc["kind"]
        hooks = []
        for hook in doc.get("webhooks") or []:
            if not served_here(hook):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            hooks.append(hook)
        out.append(
            {
                "apiVersion": doc["apiVersion"],
                "kind": kind,
                "metadata": {"name": WEBHOOKS[kind]},
                "webhooks": hooks,
            }
        )
    return out


def install_crds(cluster: Any) -> None:
    """The release's CRDs, Established (idempotent; they stay when the manager stops)."""
    release = binaries.crds("kueue")
    for crd in sorted(release.glob("kueue.x-k8s.io_*.yaml")):  # large: server-side apply (no annotation copy)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    for p in release.glob("kueue.x-k8s.io_*.yaml"):
        wait_established(cluster, f"{p.name.split('_', 1)[1].removesuffix('.yaml')}.kueue.x-k8s.io")


def wait_established(cluster: Any, crd: str, timeout: float = 90.0) -> None:
    """Polled: `kubectl wait --for=condition=Established` fails at once while a new CRD has no status yet."""
    deadline = time.monotonic() + timeout
    while True:
        obj = (
            cluster.admin.get_or_none(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}") or {}
        )
        conds = (obj.get("status") or {}).get("conditions") or []
        if any(x.get("type") == "Established" and x.get("status") == "True" for x in conds):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {crd} not Established in {timeout:.0f}s")
        time.sleep(0.5)


class Kueue(StartStop):
    def __init__(self, cluster: Any, workdir: Path) -> None:
        self.cluster = cluster
        self.dir = workdir
        self.proc: Proc | None = None
        self.installed_webhooks = False

    @property
    def log(self) -> Path:
        return self.dir / "kueue.log"

    def start(self) -> None:
        binary = binaries.ensure("kueue")["kueue"]
        release = binaries.crds("kueue")
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        c = self.cluster
        t0 = time.monotonic()
        install_crds(c)
        c.create_namespace(NAMESPACE)
        role = yaml.safe_load((release / "rbac-role.yaml").read_text())
        role["metadata"] = {"name": CLUSTER_ROLE}
        sa = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE},
        }
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": CLUSTER_ROLE},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_ROLE},
                   "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]}  # fmt: skip
        # the release's Role for Secrets in its own namespace (MultiKueue's kubeconfigs; its informer must sync)
        secrets = yaml.safe_load((release / "rbac-secrets-role.yaml").read_text())
        secrets["metadata"] = {"name": "kueue-manager-secrets-role", "namespace": NAMESPACE}
        secrets_binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                           "metadata": {"name": "kueue-manager-secrets-role", "namespace": NAMESPACE},
                           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                       "name": "kueue-manager-secrets-role"},
                           "subjects": binding["subjects"]}  # fmt: skip
        c.apply(yaml.safe_dump_all([sa, role, binding, secrets, secrets_binding]))
        c.wait_for_serviceaccount(NAMESPACE, SERVICE_ACCOUNT)
        kubeconfig = c.kubeconfig_for_serviceaccount(NAMESPACE, SERVICE_ACCOUNT, seconds=6 * 3600)

        certs = d / "certs"
        certs.mkdir(exist_ok=True)
        crt, key = c.ca.issue("kueue-webhook", "kueue-webhook-service.kueue-system.svc", server=True,
                              dns=("kueue-webhook-service.kueue-system.svc",), ips=("127.0.0.1",))  # fmt: skip
        (certs / "tls.crt").write_bytes(crt.read_bytes())
        (certs / "tls.key").write_bytes(key.read_bytes())
        self.port = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"port": self.port, "host": "127.0.0.1", "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }  # fmt: skip
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        overlay = d / "etc-overlay"
        overlay.mkdir(exist_ok=True)
        script = "\n".join([
            "set -e",
            f"mount -t tmpfs tmpfs {overlay}",
            f"mkdir -p {overlay}/upper/kueue/metrics/certs {overlay}/work",
            f"cp {certs}/tls.crt {certs}/tls.key {overlay}/upper/kueue/metrics/certs/",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/upper,workdir={overlay}/work /etc",
            f"export KUBECONFIG={kubeconfig}",
            "exec " + shlex.join([str(binary), f"--config={d / 'config.yaml'}", "--feature-gates=VisibilityOnDemand=false",
                                  "--zap-log-level=2"]),
        ])  # fmt: skip
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]
        ns = getattr(c, "ns", None)
        self.proc = Proc("kueue", ns.argv(argv) if ns is not None else argv, self.log)
        ca_bundle = base64.b64encode(c.ca.cert_file.read_bytes()).decode()
        hooks = webhook_configurations((release / "webhook-manifests.yaml").read_text(), self.port, ca_bundle)
        c.apply(yaml.safe_dump_all(hooks))
        self.installed_webhooks = True
        self._wait_ready()
        print(f"[kueue] up in {time.monotonic() - t0:.1f}s", flush=True)

    def _wait_ready(self, timeout: float = 120.0) -> None:
        """Ready when the API server gets an answer from its webhook (a dry-run ResourceFlavor) and its
        controllers have synced (a LocalQueue of a missing ClusterQueue gets a status)."""
        flavor = {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": "kueue-readiness-probe"}}
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            self.proc.check()
            try:
                self.cluster.admin.post("/apis/kueue.x-k8s.io/v1beta2/resourceflavors?dryRun=All", flavor)
                return
            except ApiError as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"Kueue's webhook did not answer in {timeout:.0f}s ({last}); log tail:\n"
                           + (self.proc.tail() if self.proc else ""))  # fmt: skip

    def stop(self) -> None:
        if self.installed_webhooks:  # first: nothing else may wait on a webhook that is going away
            for kind, name in WEBHOOKS.items():
                self.cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
            self.installed_webhooks = False
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def errors(self) -> list[str]:
        """Messages the manager logged at level error (its log is zap JSON), less EXPECTED_ERRORS."""
        out = []
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("level") != "error":
                continue
            text = f"{entry.get('logger')}: {entry.get('msg')}: {entry.get('error')}"
            if not any(e in text for e in EXPECTED_ERRORS):
                out.append(text)
        return out

    def workloads(self, ns: str) -> list[dict[str, Any]]:
        r = self.cluster.kubectl("-n", ns, "get", "workloads.kueue.x-k8s.io", "-o", "json")
        return list(json.loads(r.stdout)["items"])
