"""A real Kubernetes control plane on loopback: etcd + kube-apiserver + kube-controller-manager.

    with Cluster(workdir) as c:
        c.kubectl("get", "ns")
        kubeconfig = c.kubeconfig_for_serviceaccount("kubetune-system", "kubetune-operator")

Per-run certificates (one CA), RBAC + Node authorization, the default admission
plugins plus NodeRestriction, service-account token signing, and the controller
manager with every controller (`--controllers=*`) using per-controller
service-account credentials. With `ns` (a netns.Namespace) every component runs inside
that private network + mount namespace and the host reaches the API server through a
forwarder on the same loopback port (see kubelet_node.py); without it, on the host's
loopback, and the node agent (node_agent.py) plays kubelet and scheduler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import binaries
from .kube import ApiError, Credentials, Kube
from .netns import Namespace
from .pki import CA, service_account_keypair
from .procs import Proc, StartStop, free_port

KUBECTL = os.environ.get("KUBETUNE_E2E_KUBECTL", "/usr/bin/kubectl")
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Namespace labels for the API server's built-in PodSecurity admission: refuse any pod that does not meet the
# "restricted" profile (what the chart, the trainer and the serving Deployment are built for).
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, **auth: str) -> Path:
    """Write a kubeconfig (JSON is valid YAML) with client-certificate/-key or token auth."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": user, "context": {"cluster": "e2e", "user": user}}],
        "current-context": user,
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path


class Cluster(StartStop):
    def __init__(self, workdir: Path, *, node_name: str = "e2e-node", ns: Namespace | None = None) -> None:
        self.dir = workdir
        self.node_name = node_name
        self.ns = ns
        self.leftovers: list[str] = []  # what stop() could not clean up (namespace mode)
        self.procs: list[Proc] = []
        self.port = 0
        self.server = ""
        self.audit_log: Path | None = None  # KUBETUNE_E2E_AUDIT=1: the apiserver's audit log

    # -- lifecycle -------------------------------------------------------------------
    def _audit_args(self, pki: Path, logs: Path) -> list[str]:
        """With KUBETUNE_E2E_AUDIT=1, the apiserver writes an audit log (`audit_log`) of the requests made by
        ServiceAccounts, at Metadata level (who, verb, resource, user agent, times; no bodies): what a
        benchmark reads to attribute the requests an account made. Off by default (it costs disk and time)."""
        self.audit_log = None
        if os.environ.get("KUBETUNE_E2E_AUDIT") != "1":
            return []
        policy = pki / "audit-policy.yaml"
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
            "- level: Metadata\n  userGroups: [system:serviceaccounts]\n- level: None\n"
        )
        self.audit_log = logs / "audit.log"
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=500", "--audit-log-maxbackup=1", "--audit-log-mode=blocking"]  # fmt: skip

    def start(self) -> None:
        bins = binaries.ensure("etcd", "kube-apiserver", "kube-controller-manager")
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        if self.ns is not None:
            self.ns.start()
        pki, logs = d / "pki", d / "logs"
        self.log_dir = logs
        ca = self.ca = CA(pki)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=("127.0.0.1", "10.0.0.1"),
        )
        sa_key, sa_pub = service_account_keypair(pki)
        admin_crt, admin_key = ca.issue("admin", "kubetune-e2e-admin", ("system:masters",))
        kcm_crt, kcm_key = ca.issue("kcm", "system:kube-controller-manager")
        kubelet_client = ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
        )
        self.kubeconfig = write_kubeconfig(
            d / "admin.kubeconfig",
            self.server,
            ca.cert_file,
            "admin",
            **{"client-certificate": str(admin_crt), "client-key": str(admin_key)},
        )
        kcm_kubeconfig = write_kubeconfig(
            d / "kcm.kubeconfig",
            self.server,
            ca.cert_file,
            "kcm",
            **{"client-certificate": str(kcm_crt), "client-key": str(kcm_key)},
        )
        self.admin = Kube(Credentials(self.server, ca.cert_file, admin_crt, admin_key))

        etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                str(bins["etcd"]),
                "--name=e2e",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=e2e=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            logs / "etcd.log",
        )
        self._spawn(
            "kube-apiserver",
            [
                str(bins["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={ca.cert_file}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",  # on top of the default set
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--allow-privileged=true",
                # the `kubernetes` Service's endpoints may not be loopback addresses
                "--endpoint-reconciler-type=none",
                # `kubectl logs`: the API server reaches the kubelet at the node's InternalIP
                f"--kubelet-client-certificate={kubelet_client[0]}",
                f"--kubelet-client-key={kubelet_client[1]}",
                "--kubelet-preferred-address-types=InternalIP",
                "--v=1",
                *self._audit_args(pki, logs),
            ],
            logs / "kube-apiserver.log",
        )
        if self.ns is not None:  # the host's kubectl/clients reach it on the same port of the host's loopback
            sock = d / "apiserver.sock"
            fwd = [sys.executable, str(Path(__file__).with_name("forward.py"))]
            self._spawn(
                "apiserver-forward-ns", [*fwd, f"unix:{sock}=tcp:127.0.0.1:{self.port}"], logs / "forward.log"
            )
            self.procs.append(
                Proc(
                    "apiserver-forward-host",
                    [*fwd, f"tcp:127.0.0.1:{self.port}=unix:{sock}"],
                    logs / "forward-host.log",
                )
            )
        self._wait_ready()
        self._spawn(
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={pki / 'kcm'}",
                "--controllers=*",
                "--use-service-account-credentials",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca.cert_file}",
                f"--cluster-signing-cert-file={ca.cert_file}",
                f"--cluster-signing-key-file={ca.key_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                # node loss noticed in ~20 s, not the default 50 s: the kubelets renew their Lease every 5 s
                # (kubelet_node.py), so 20 s is four missed renewals; the gang's pods then tolerate the
                # unreachable/not-ready taints for spec.distributed.nodeLossTolerationSeconds
                "--node-monitor-grace-period=20s",
                "--node-monitor-period=2s",
                "--v=1",
            ],
            logs / "kube-controller-manager.log",
        )
        # the serviceaccount controller creating `default` proves the controller manager works
        self.wait_for_serviceaccount("default", "default", timeout=90)

    def _spawn(self, name: str, argv: list[str], log: Path) -> Proc:
        p = Proc(name, self.ns.argv(argv) if self.ns is not None else argv, log)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        if self.ns is not None:
            self.leftovers = self.ns.stop()
            if self.leftovers:
                print("e2e teardown left behind: " + "; ".join(self.leftovers), file=sys.stderr)

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                p.check()
            try:
                self.admin.request("GET", "/readyz")
                return
            except json.JSONDecodeError:  # 200 with body "ok", which is not JSON
                return
            except (ApiError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("kube-apiserver not ready:\n" + self.procs[-1].tail())
            time.sleep(0.5)

    # -- helpers -----------------------------------------------------------------------
    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run /usr/bin/kubectl against this cluster (admin unless `kubeconfig` is given)."""
        cmd = [KUBECTL, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def apply(self, manifest: str) -> str:
        return self.kubectl("apply", "-f", "-", input=manifest).stdout

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for the admin user."""
        from kubernetes import config  # noqa: PLC0415 - only needed by tests that use it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def wait_for_serviceaccount(self, ns: str, name: str, timeout: float = 60.0) -> None:
        self.admin.wait_for(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}", timeout=timeout)

    def create_namespace(self, ns: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace (with `labels`, also set on one that exists) and wait for its `default`
        ServiceAccount (pods need it)."""
        try:
            self.admin.post("/api/v1/namespaces", {"metadata": {"name": ns, "labels": labels or {}}})
        except ApiError as e:
            if e.status != 409:
                raise
            if labels:
                self.admin.patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": labels}})
        self.wait_for_serviceaccount(ns, "default")

    def token_for_serviceaccount(self, ns: str, name: str, seconds: int = 3600) -> str:
        tr = self.admin.post(
            f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return str(tr["status"]["token"])

    def kubeconfig_for_serviceaccount(self, ns: str, name: str, seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as system:serviceaccount:<ns>:<name> (TokenRequest)."""
        token = self.token_for_serviceaccount(ns, name, seconds)
        return write_kubeconfig(
            self.dir / f"sa-{ns}-{name}.kubeconfig",
            self.server,
            self.ca.cert_file,
            f"{ns}-{name}",
            token=token,
        )

    def write_kubeconfig(
        self, path: Path, user: str, crt: Path, key: Path, server: str | None = None
    ) -> Path:
        """A client-certificate kubeconfig for this cluster (`server`: another address of the API server,
        e.g. the `kubernetes` Service's ClusterIP for a node in a network namespace of its own)."""
        return write_kubeconfig(
            path,
            server or self.server,
            self.ca.cert_file,
            user,
            **{"client-certificate": str(crt), "client-key": str(key)},
        )

    def credentials_for(self, name: str, cn: str, orgs: tuple[str, ...] = ()) -> Credentials:
        """Client-certificate credentials for an arbitrary user/group (e.g. a node)."""
        crt, key = self.ca.issue(name, cn, orgs)
        return Credentials(self.server, self.ca.cert_file, crt, key)

    def logs(self) -> dict[str, str]:
        return {p.name: p.tail(200) for p in self.procs}
