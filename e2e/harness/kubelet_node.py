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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import binaries, images
from .kube import ApiError
from .netns import (
    DNS_IP,
    HOST_SERVICES_IP,
    KUBERNETES_IP,
    NodeNet,
    cgroup_pids,
    kill_all,
    make_cgroup,
    node_ip,
    pod_cidr,
    remove_cgroups,
)
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
        self,
        cluster: Any,
        workdir: Path,
        name: str = "e2e-node",
        *,
        pause_only: bool = False,
        first: KubeletNode | None = None,
        index: int = 1,
        peers: tuple[KubeletNode, ...] = (),
    ) -> None:
        """`first` given: an extra node (number `index` >= 2) of the cluster whose first node it is: a
        network namespace of its own (netns.NodeNet; `peers`: the other extra nodes, for the routes
        between them), no scheduler or CoreDNS of its own (the first node's serve the cluster), and the
        first node's images without an import (a hard-linked copy of its containerd root: seconds)."""
        self.cluster = cluster
        self.ns = cluster.ns
        assert self.ns is not None, "the cluster must run in a Namespace (Cluster(..., ns=...))"
        self.dir = workdir
        self.name = name
        self.first, self.index = first, index if first is not None else 1
        self.ip, self.pod_cidr = node_ip(self.index), pod_cidr(self.index)
        self.net: NodeNet | Any = (
            NodeNet(self.ns, self.index, [p.net for p in peers]) if first is not None else self.ns
        )
        self.root: Path | None = None  # containerd's root
        self.clone: Path | None = None  # an extra node's copy of the first node's root (removed on stop)
        self.built: list[Any] = []
        self.leftovers: list[str] = []  # an extra node's: what stop() could not remove
        # the kubelet's CRI logs (node 1: the namespace's /var/log/pods, kept after the run)
        self.pod_logs_dir = self.ns.pod_logs_dir if first is None else workdir / "pod-logs"
        self.procs: list[Proc] = []
        self.pause_only = pause_only
        # unique per node: two nodes of one pytest process (the session's, test_teardown's) never share it
        self.cgroup_root = f"/kubetune-e2e-{os.getpid()}-{int(time.time())}-{os.urandom(3).hex()}"
        self._root_lock: Any = None
        self.errors: list[str] = []
        self._exposed: dict[int, str] = {}
        # The kubelet's root: under the node's directory unless that path is too long for the unix sockets the
        # kubelet binds there (pod-resources/<10 digits>: 108 bytes in all, counting the path), as under pytest-xdist's
        # per-worker temp directories or a deep KUBETUNE_CLUSTER_DIR; then a short directory in /tmp, linked
        # from the node's directory and removed with the node.
        self.kubelet_dir = workdir / "kubelet"
        self._short_kubelet_dir = (
            len(str(self.kubelet_dir.absolute())) + len("/pod-resources/0123456789") >= 100
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        tools = _debian_binaries()
        bins = binaries.ensure("kubelet", "kube-scheduler", "coredns", "pause")
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        self.pod_logs_dir.mkdir(parents=True, exist_ok=True)
        if self._short_kubelet_dir:
            self.kubelet_dir = Path(tempfile.mkdtemp(prefix="kt-kubelet-"))
            (d / "kubelet").unlink(missing_ok=True)
            (d / "kubelet").symlink_to(self.kubelet_dir)
        self.ctr_sock = d / "containerd.sock"
        self.ctr = [tools["ctr"], "--address", str(self.ctr_sock)]
        if self.first is not None:
            self.net.start()
            self.root = self._clone_root(self.first)
            self._purge_containers(self.root)
            self._containerd(self.root)
            self.built = self.first.built  # the same images: checked (refs and manifests), nothing sent
        else:
            self.built = images.build_pause() if self.pause_only else images.build_all()
            self.root = d / "containerd-root" if self.pause_only else self._containerd_root()
            self._containerd(self.root)
        images.import_all(self.built, self.ns.argv(self.ctr))
        self._kubelet(bins["kubelet"])
        if self.first is None:
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
        elif self.first is None and self.root is not None and self.root.is_relative_to(self.dir):
            # a containerd root of this node's own (another run held the cache's, or pause_only): 13 GB with
            # both images, in pytest's temp dirs, which keep the last three runs: removed now
            subprocess.run(["rm", "-rf", str(self.root)], capture_output=True)
        if self.first is not None:  # an extra node goes now, not with the namespace: leave nothing behind
            self.leftovers = self._remove()
        if self._short_kubelet_dir and self.kubelet_dir.parent == Path(tempfile.gettempdir()):
            # what is mounted there lives in the cluster's mount namespace (gone with it); the host sees files
            subprocess.run(["rm", "-rf", str(self.kubelet_dir)], capture_output=True)

    # -- an extra node's power-off and removal ------------------------------------------
    def _shims(self) -> list[int]:
        """This node's containerd-shim processes (daemons: they outlive containerd), by their -address."""
        out = []
        for p in Path("/proc").iterdir():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                p.name.isdigit()
                and cmd
                and b"containerd-shim" in cmd[0]
                and str(self.ctr_sock).encode() in cmd
            ):
                out.append(int(p.name))
        return out

    def power_off(self) -> None:
        """Fault injection: the node loses power. Its link goes down first (peers get no FIN or RST, as
        from a machine that is switched off), then the kubelet, containerd, the shims and every container
        process get SIGKILL: no drain, no graceful termination, nothing reported to the API server."""
        assert self.first is not None, (
            "power_off() is for extra nodes (node 1 runs the control plane's helpers)"
        )
        self.net.unplug()
        pids = (
            [p.popen.pid for p in self.procs if p.alive()] + self._shims() + cgroup_pids([self.cgroup_root])
        )
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.popen.wait()

    def _mounts(self) -> list[str]:
        """Mount points of the cluster's mount namespace under this node's directories (kubelet volumes,
        sandbox shm, container rootfs, pod network namespaces)."""
        under = [str(self.dir), str(self.kubelet_dir)] + ([str(self.clone)] if self.clone else [])
        out = []
        for line in Path(f"/proc/{self.ns.pid}/mountinfo").read_text().splitlines():
            mp = line.split()[4].encode().decode("unicode_escape")
            if any(mp == u or mp.startswith(u + "/") for u in under):
                out.append(mp)
        return out

    def _remove(self) -> list[str]:
        """Kill what is left of this node, unmount, end its network namespace, delete its copy of the
        containerd root and its cgroups. Returns what could not be removed."""
        problems: list[str] = []
        left = kill_all(lambda: self._shims() + cgroup_pids([self.cgroup_root]))
        if left:
            problems.append(f"{self.name}: processes still alive: {left}")
        for mp in sorted(self._mounts(), key=len, reverse=True):
            subprocess.run(self.ns.argv(["umount", "-l", mp]), capture_output=True)
        if left := self._mounts():
            problems.append(f"{self.name}: mounts left: {left[:5]}")
        if self.ns.holder is not None:
            problems += remove_cgroups([self.cgroup_root])
        if self.cgroup_root in self.ns.cgroups:
            self.ns.cgroups.remove(self.cgroup_root)
        self.net.stop()
        if self.clone is not None:
            subprocess.run(["rm", "-rf", str(self.clone)], capture_output=True)  # C: 3x faster than rmtree
            if self.clone.exists():
                problems.append(f"{self.name}: {self.clone} not removed")
            self.clone = None
        return problems

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, self.net.argv(argv), self.dir / "logs" / f"{name}.log", env=env)
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

    def _clone_root(self, first: KubeletNode) -> Path:
        """A copy of the first node's containerd root with its images (content and unpacked snapshots):
        files hard-linked (the layers are never written in place), the two bolt databases copied while
        the first node's containerd is stopped (SIGSTOP), so the copy is a consistent snapshot. It lies
        beside the source root (hard links need the same file system); removed by stop()."""
        assert first.root is not None
        # beside the source root (the cache's, or node 1's own fresh one): hard links need one file system
        dst = first.root.parent / "clones" / f"{self.name}-{self.cgroup_root.rsplit('-', 1)[-1]}"
        dst.mkdir(parents=True)
        self.clone = dst  # removed by stop(), also after a failed copy
        parts = ("io.containerd.content.v1.content", "io.containerd.metadata.v1.bolt",
                 "io.containerd.snapshotter.v1.overlayfs")  # fmt: skip
        for part in parts:
            if (first.root / part).exists():
                self._link_tree(first.root / part, dst / part)
        dbs = [p.relative_to(first.root) for part in parts for p in (first.root / part).rglob("*.db")]
        containerd = next(p for p in first.procs if p.name == "containerd")
        os.kill(containerd.popen.pid, signal.SIGSTOP)
        try:
            for db in dbs:
                (dst / db).unlink()
                shutil.copy2(first.root / db, dst / db)
        finally:
            os.kill(containerd.popen.pid, signal.SIGCONT)
        return dst

    @staticmethod
    def _link_tree(src: Path, dst: Path) -> None:
        """`cp -a --link` of a tree the first node's containerd keeps using: a container's snapshot it
        removes while the copy runs is gone from the source (cp: cannot stat ...: No such file or
        directory) and must be absent from the copy too, so only that error is let through. The image
        snapshots the extra node needs are committed and stay; the bolt databases are copied afterwards
        with containerd stopped, and the containers they still name are purged from the copy."""
        r = subprocess.run(["cp", "-a", "--link", str(src), str(dst)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        other = [ln for ln in r.stderr.splitlines() if not ln.endswith("No such file or directory")]
        if other or not r.stderr.strip():
            raise RuntimeError(f"copying {src} to {dst} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        print(
            f"{dst.parent.name}: {len(r.stderr.splitlines())} entries of {src.name} vanished while copied "
            "(removed by the first node's containerd)",
            file=sys.stderr,
        )

    def _purge_containers(self, root: Path) -> None:
        """Drop the first node's containers and pod sandboxes from the copy before the CRI plugin sees
        them: otherwise this node's kubelet would stop those foreign sandboxes, and CNI would tear down
        the network of pods that run on the first node. A containerd without CRI removes them."""
        conf = self._containerd_config(root, cri=False)
        p = Proc("containerd-purge", self.net.argv(["containerd", "--config", str(conf)]),
                 self.dir / "logs" / "containerd-purge.log")  # fmt: skip
        try:
            self._wait_socket(p)
            c = " ".join(self.ctr) + " -n k8s.io"
            self.ns.run(["sh", "-c", f"for x in $({c} c ls -q); do {c} c rm $x; done >/dev/null 2>&1; true"],
                        timeout=120)  # fmt: skip
        finally:
            p.stop(grace=10)
        self.ctr_sock.unlink(missing_ok=True)

    def _wait_socket(self, p: Proc) -> None:
        deadline = time.monotonic() + 30
        while not self.ctr_sock.exists():
            p.check()
            if time.monotonic() > deadline:
                raise TimeoutError("containerd did not start:\n" + p.tail())
            time.sleep(0.1)

    def _containerd_config(self, root: Path, cri: bool = True) -> Path:
        d = self.dir
        cni = d / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-bridge.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "e2e" if self.index == 1 else f"e2e-node{self.index}",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.pod_cidr}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        }
                    ],
                }
            )
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        # an extra node's pod network namespaces under its own state dir (not the shared /run/netns), so
        # its teardown finds them even after a power-off
        netns = "\n  netns_mounts_under_state_dir = true" if self.index > 1 else ""
        disabled = "" if cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        conf = d / ("containerd.toml" if cri else "containerd-purge.toml")
        conf.write_text(f"""version = 2
{disabled}root = "{root}"
state = "{d / "containerd-state"}"
[grpc]
  address = "{self.ctr_sock}"
[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true{netns}
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
        return conf

    def _containerd(self, root: Path) -> None:
        p = self._spawn("containerd", ["containerd", "--config", str(self._containerd_config(root))])
        self._wait_socket(p)

    def _kubelet(self, kubelet: Path) -> None:
        c, d = self.cluster, self.dir
        # a file name per node: the CA writes <name>.crt, and a kubelet re-reads its client certificate (one
        # file shared by two nodes made the first authenticate as the second, which the Node authorizer refused)
        crt_name = "kubelet" if self.index == 1 else f"kubelet-{self.name}"
        crt, key = c.ca.issue(crt_name, f"system:node:{self.name}", ("system:nodes",))
        # an extra node reaches the API server where its pods do: the `kubernetes` ClusterIP's forwarder
        server = f"https://{KUBERNETES_IP}:443" if self.index > 1 else None
        kubeconfig = c.write_kubeconfig(d / "kubelet.kubeconfig", crt_name, crt, key, server=server)
        make_cgroup(self.cgroup_root)
        self.ns.cgroups.append(self.cgroup_root)
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
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
            # an extra node's pod logs in a directory of its own: a kubelet deletes every pod log directory
            # of /var/log/pods whose pod it does not run, so two kubelets there delete each other's logs
            **({"podLogsDir": str(self.pod_logs_dir)} if self.index > 1 else {}),
            # Lease renewed every 5 s (a quarter of this): the controller manager's 20 s grace is four renewals
            "nodeLeaseDurationSeconds": 20,
        }
        (d / "kubelet.yaml").write_text(json.dumps(config, indent=1))
        self._spawn(
            "kubelet",
            [
                str(kubelet),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.kubelet_dir}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                f"--cert-dir={d / 'kubelet-pki'}",
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
        """stdout+stderr of every container of every pod on this node whose name starts with `prefix`, from
        the CRI log files (<workdir>/netns/pod-logs = the namespace's /var/log/pods; an extra node's
        <its workdir>/pod-logs), oldest first."""
        out = []
        for f in sorted(self.pod_logs_dir.glob(f"{ns}_{prefix}*/*/*.log")):
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split(" ", 3)  # <time> <stream> <P|F> <text>
                if len(parts) == 4:
                    out.append(parts[3] + ("\n" if parts[2] == "F" else ""))
        return "".join(out)
