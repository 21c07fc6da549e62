"""One real node: containerd + kubelet + kube-scheduler + CoreDNS inside the cluster's namespace.

    node = KubeletNode(cluster, workdir); node.start(); ...; node.stop()
    with KubeletNode(cluster, workdir) as node: ...     # stop() even when the body raises

`pause_only=True`: only the pause image, in a fresh containerd root under the workdir (seconds,
not the 4.7 GB trainer image; the cached root is never touched, so nothing is pruned from it).

The cluster (etcd, kube-apiserver, kube-controller-manager) runs in the same private
network + mount namespace (netns.Namespace): the API server must reach the kubelet at
the node's IP for `kubectl logs`, and the kubelet refuses loopback node IPs. The host
reaches the API server through forward.py; pods reach it at the `kubernetes` Service's
ClusterIP (10.0.0.1:443, a forwarder standing in for kube-proxy's one rule) and resolve
names through CoreDNS at 10.0.0.10. Host services (S3) are carried in by `expose()`, and
namespace services out to the host by `publish()`.

* containerd 1.6 (Debian) with its CRI plugin: runc, overlayfs, the CNI bridge +
  host-local plugins (pod CIDR 10.88.0.0/16), `restrict_oom_score_adj` (the sandbox lacks
  CAP_SYS_RESOURCE), the locally built pause image as sandbox image. Its root (images) is
  kept in the cache, so images import once per content change.
* kubelet v1.32.2: cgroupfs driver under a per-run cgroupRoot, x509 + webhook authn/authz,
  `failSwapOn: false`, `makeIPTablesUtilChains: false`, `oomScoreAdj: 0`, image GC off
  (the images cannot be pulled again), eviction thresholds near zero (shared CI disks).
* kube-scheduler v1.32.2 (real binding), CoreDNS (kubernetes plugin, cluster.local).
* The node advertises `nvidia.com/gpu: 8` by a node status patch (no device plugin: GPU
  manifests schedule, but no GPU is there).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import binaries, images
from .kube import ApiError
from .netns import DNS_IP, HOST_SERVICES_IP, KUBERNETES_IP, NODE_IP, POD_CIDR, make_cgroup
from .procs import Proc, StartStop, free_port

HERE = Path(__file__).resolve().parent
GPUS = "8"
CNI_BIN = "/usr/lib/cni"


def _debian_binaries() -> dict[str, str]:
    found = {b: shutil.which(b) or "" for b in ("containerd", "containerd-shim-runc-v2", "ctr", "runc")}
    if not os.access(f"{CNI_BIN}/bridge", os.X_OK):
        found["cni bridge"] = ""
    missing = [b for b, p in found.items() if not p]
    if missing:
        raise binaries.BinariesUnavailable(
            f"missing {', '.join(missing)}: apt-get install runc containerd containernetworking-plugins "
            "mmdebstrap (see e2e/README.md)"
        )
    return found


class KubeletNode(StartStop):
    def __init__(
        self, cluster: Any, workdir: Path, name: str = "e2e-node", *, pause_only: bool = False
    ) -> None:
        self.cluster = cluster
        self.ns = cluster.ns
        assert self.ns is not None, "the cluster must run in a Namespace (Cluster(..., ns=...))"
        self.dir = workdir
        self.name = name
        self.procs: list[Proc] = []
        self.pause_only = pause_only
        # unique per node: two nodes of one pytest process (the session's, test_teardown's) never share it
        self.cgroup_root = f"/kubetune-e2e-{os.getpid()}-{int(time.time())}-{os.urandom(3).hex()}"
        self._root_lock: Any = None
        self.errors: list[str] = []
        self._exposed: dict[int, str] = {}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        tools = _debian_binaries()
        bins = binaries.ensure("kubelet", "kube-scheduler", "coredns", "pause")
        built = images.build_pause() if self.pause_only else images.build_all()
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        self.ctr_sock = d / "containerd.sock"
        self.ctr = [tools["ctr"], "--address", str(self.ctr_sock)]
        self._containerd(d / "containerd-root" if self.pause_only else self._containerd_root())
        images.import_all(built, self.ns.argv(self.ctr))
        self._kubelet(bins["kubelet"])
        self._scheduler(bins["kube-scheduler"])
        self._coredns(bins["coredns"])
        self._wait_node_ready()
        print(f"kubelet node ready in {time.monotonic() - t0:.0f}s", file=sys.stderr)

    def stop(self) -> None:
        containerd = next((p for p in self.procs if p.name == "containerd"), None)
        for p in reversed(self.procs):
            if p is not containerd:
                p.stop(grace=5)
        if containerd is not None and containerd.alive():
            # the kubelet leaves pods running when it stops: remove their containers while containerd
            # runs, so the kept containerd root holds images only
            c = " ".join(self.ctr) + " -n k8s.io"
            try:
                self.ns.run(
                    [
                        "sh",
                        "-c",
                        f"for x in $({c} c ls -q); do {c} t kill -s SIGKILL $x; {c} t rm -f $x;"
                        f" {c} c rm $x; done >/dev/null 2>&1; true",
                    ],
                    timeout=60,
                )
            except Exception as e:  # noqa: BLE001 - best effort; the namespace teardown kills the rest
                self.errors.append(f"container cleanup: {e}")
            containerd.stop(grace=10)
        self.procs.clear()
        # containers and shims die with the namespace and its cgroups (cluster.stop())
        if self._root_lock is not None:
            self._root_lock.close()
            self._root_lock = None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, self.ns.argv(argv), self.dir / "logs" / f"{name}.log", env=env)
        self.procs.append(p)
        return p

    def _containerd_root(self) -> Path:
        """The cached containerd root (images survive runs); a fresh one if another run holds it."""
        root = binaries.cache_dir() / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")  # noqa: SIM115 - held for the node's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return self.dir / "containerd-root"
        self._root_lock = lock
        return root / "root"

    def _containerd(self, root: Path) -> None:
        d = self.dir
        cni = d / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-bridge.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "e2e",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        }
                    ],
                }
            )
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "containerd.toml").write_text(f"""version = 2
root = "{root}"
state = "{d / "containerd-state"}"
[grpc]
  address = "{self.ctr_sock}"
[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni}"
""")
        p = self._spawn("containerd", ["containerd", "--config", str(d / "containerd.toml")])
        deadline = time.monotonic() + 30
        while not self.ctr_sock.exists():
            p.check()
            if time.monotonic() > deadline:
                raise TimeoutError("containerd did not start:\n" + p.tail())
            time.sleep(0.1)

    def _kubelet(self, kubelet: Path) -> None:
        c, d = self.cluster, self.dir
        crt, key = c.ca.issue("kubelet", f"system:node:{self.name}", ("system:nodes",))
        kubeconfig = c.write_kubeconfig(d / "kubelet.kubeconfig", "kubelet", crt, key)
        make_cgroup(self.cgroup_root)
        self.ns.cgroups.append(self.cgroup_root)
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "x509": {"clientCAFile": str(c.ca.cert_file)},
                "webhook": {"enabled": True},
                "anonymous": {"enabled": False},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "oomScoreAdj": 0,
            "clusterDNS": [DNS_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "containerRuntimeEndpoint": f"unix://{self.ctr_sock}",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "protectKernelDefaults": False,
            "syncFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
        }
        (d / "kubelet.yaml").write_text(json.dumps(config, indent=1))
        self._spawn(
            "kubelet",
            [
                str(kubelet),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={d / 'kubelet'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _scheduler(self, scheduler: Path) -> None:
        c, d = self.cluster, self.dir
        crt, key = c.ca.issue("scheduler", "system:kube-scheduler")
        kc = c.write_kubeconfig(d / "scheduler.kubeconfig", "scheduler", crt, key)
        self._spawn(
            "kube-scheduler",
            [
                str(scheduler),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )

    def _coredns(self, coredns: Path) -> None:
        c, d = self.cluster, self.dir
        # CoreDNS's own identity, bound to the ClusterRole kubeadm gives it
        crt, key = c.ca.issue("coredns", "system:coredns")
        kc = c.write_kubeconfig(d / "coredns.kubeconfig", "coredns", crt, key)
        c.apply(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [
                        {
                            "apiVersion": "rbac.authorization.k8s.io/v1",
                            "kind": "ClusterRole",
                            "metadata": {"name": "system:coredns"},
                            "rules": [
                                {
                                    "apiGroups": [""],
                                    "resources": ["endpoints", "services", "pods", "namespaces"],
                                    "verbs": ["list", "watch"],
                                },
                                {
                                    "apiGroups": ["discovery.k8s.io"],
                                    "resources": ["endpointslices"],
                                    "verbs": ["list", "watch"],
                                },
                            ],
                        },
                        {
                            "apiVersion": "rbac.authorization.k8s.io/v1",
                            "kind": "ClusterRoleBinding",
                            "metadata": {"name": "system:coredns"},
                            "roleRef": {
                                "apiGroup": "rbac.authorization.k8s.io",
                                "kind": "ClusterRole",
                                "name": "system:coredns",
                            },
                            "subjects": [{"kind": "User", "name": "system:coredns"}],
                        },
                    ],
                }
            )
        )
        (d / "Corefile").write_text(f""".:53 {{
    errors
    ready 127.0.0.1:{free_port()}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kc}
        pods insecure
        ttl 0
    }}
}}
""")
        self._spawn("coredns", [str(coredns), "-conf", str(d / "Corefile")])
        # the `kubernetes` Service's ClusterIP, as kube-proxy would route it (the only ClusterIP pods use)
        self._spawn(
            "cluster-ip",
            [sys.executable, str(HERE / "forward.py"), f"tcp:{KUBERNETES_IP}:443=tcp:127.0.0.1:{c.port}"],
        )

    def _wait_node_ready(self, timeout: float = 120) -> None:
        api = self.cluster.admin
        deadline = time.monotonic() + timeout
        patched = False
        while True:
            for p in self.procs:
                p.check()
            try:
                node = api.get(f"/api/v1/nodes/{self.name}")
            except ApiError:
                node = None
            if node is not None:
                if not patched:
                    api.patch(
                        f"/api/v1/nodes/{self.name}/status",
                        {"status": {"capacity": {"nvidia.com/gpu": GPUS}}},
                        content_type="application/merge-patch+json",
                    )
                    patched = True
                conds = {x["type"]: x["status"] for x in node["status"].get("conditions", [])}
                gpus = node["status"].get("allocatable", {}).get("nvidia.com/gpu")
                if conds.get("Ready") == "True" and gpus == GPUS:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} not Ready:\n" + self.procs[1].tail())
            time.sleep(0.5)

    # -- helpers -----------------------------------------------------------------------
    def expose(self, host_port: int, ns_port: int | None = None) -> str:
        """Carry a host TCP port (e.g. MinIO) into the namespace, at 10.0.0.20 and `ns_port` (default: the
        same port); returns `host:port` for pods."""
        ns_port = ns_port or host_port
        sock = self.dir / f"host-{host_port}.sock"
        self.procs.append(
            Proc(
                f"expose-{host_port}-host",
                [sys.executable, str(HERE / "forward.py"), f"unix:{sock}=tcp:127.0.0.1:{host_port}"],
                self.dir / "logs" / f"expose-{host_port}.log",
            )
        )
        self._spawn(
            f"expose-{host_port}",
            [sys.executable, str(HERE / "forward.py"), f"tcp:{HOST_SERVICES_IP}:{ns_port}=unix:{sock}"],
        )
        return f"{HOST_SERVICES_IP}:{ns_port}"

    def publish(self, port: int) -> str:
        """Carry a TCP port of the namespace's loopback (e.g. a Prometheus run in here) out to the same
        port of the host's loopback, the reverse of `expose()`; returns `127.0.0.1:port` for the host."""
        sock = self.dir / f"ns-{port}.sock"
        self._spawn(
            f"publish-{port}", [sys.executable, str(HERE / "forward.py"), f"unix:{sock}=tcp:127.0.0.1:{port}"]
        )
        self.procs.append(
            Proc(
                f"publish-{port}-host",
                [sys.executable, str(HERE / "forward.py"), f"tcp:127.0.0.1:{port}=unix:{sock}"],
                self.dir / "logs" / f"publish-{port}-host.log",
            )
        )
        return f"127.0.0.1:{port}"

    def component_logs(self) -> dict[str, str]:
        return {p.name: p.tail(60) for p in self.procs}

    # -- what the suite does to pods (the same calls as node_agent.NodeAgent) ------------
    def pod_endpoint(self, host_port: int) -> str:
        """`host:port` at which pods reach a host TCP port (carried in once per port)."""
        if host_port not in self._exposed:
            self._exposed[host_port] = self.expose(host_port)
        return self._exposed[host_port]

    def _container_id(self, ns: str, pod: str, container: str | None) -> str:
        got = self.cluster.admin.get(f"/api/v1/namespaces/{ns}/pods/{pod}")
        for cs in got["status"].get("containerStatuses") or []:
            if container in (None, cs["name"]) and "running" in cs.get("state", {}) and cs.get("containerID"):
                return str(cs["containerID"]).split("://", 1)[1]
        raise KeyError(f"no running container in pod {ns}/{pod} on {self.name}")

    def task_pid(self, ns: str, pod: str, container: str | None = None) -> int:
        """Host PID of a running container's first process."""
        cid = self._container_id(ns, pod, container)
        out = self.ns.run([*self.ctr, "-n", "k8s.io", "tasks", "ls"]).stdout
        for line in out.splitlines()[1:]:
            f = line.split()
            if f and f[0] == cid:
                return int(f[1])
        raise KeyError(f"no task for container {cid} of {ns}/{pod}")

    def kill_container(
        self, ns: str, pod: str, container: str | None = None, sig: int = signal.SIGKILL
    ) -> None:
        """Fault injection: signal a running container's first process (SIGKILL ~ an OOM kill; with
        SIGKILL the kernel then kills the rest of the container's PID namespace)."""
        cid = self._container_id(ns, pod, container)
        self.ns.run([*self.ctr, "-n", "k8s.io", "tasks", "kill", "-s", signal.Signals(sig).name, cid])

    def logs(self, ns: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        """`kubectl logs` (through the kubelet's API); for a pod already deleted, its files under
        /var/log/pods while the kubelet keeps them."""
        args = ["-n", ns, "logs", pod] + (["-c", container] if container else ["--all-containers"])
        r = self.cluster.kubectl(*args, *(["--previous"] if previous else []), check=False)
        if r.returncode == 0:
            return r.stdout
        return self.pod_logs(ns, pod)

    def pod_logs(self, ns: str, prefix: str) -> str:
        """stdout+stderr of every container of every pod whose name starts with `prefix`, from the
        CRI log files (<workdir>/netns/pod-logs = the namespace's /var/log/pods), oldest first."""
        out = []
        for f in sorted(self.ns.pod_logs_dir.glob(f"{ns}_{prefix}*/*/*.log")):
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split(" ", 3)  # <time> <stream> <P|F> <text>
                if len(parts) == 4:
                    out.append(parts[3] + ("\n" if parts[2] == "F" else ""))
        return "".join(out)
