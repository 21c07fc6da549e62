"""A private network + mount namespace for the real-kubelet mode.

The kubelet, containerd, the CNI bridge and the control plane change sysctls, create
interfaces and mount things. All of it happens in here, never on the host:

* `unshare --net --mount --propagation private` holds the namespace (a sleeping process);
  every component joins it with `nsenter`;
* the only interface is `lo`, with the addresses the node needs (node IP, the `kubernetes`
  Service's ClusterIP, cluster DNS, host services); the CNI bridge `cni0` comes later;
* the /proc/sys files the kubelet writes at start (vm.overcommit_memory, kernel.panic, ...)
  are bind-mounted over with plain files, so the host's values never change;
* tmpfs over /run/netns, /run/containerd, /var/lib/cni and /var/log/containers, and
  <workdir>/pod-logs over /var/log/pods (kept after the run), the fixed paths containerd,
  the CNI plugins and the kubelet use.

`stop()` kills every process in the namespace's mount namespace and every process in
the given cgroups, removes those cgroups, then ends the holder: the namespace and all
its mounts go with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

NODE_IP = "10.1.0.1"
KUBERNETES_IP = "10.0.0.1"  # first address of the Service CIDR: the `kubernetes` Service
DNS_IP = "10.0.0.10"
HOST_SERVICES_IP = "10.0.0.20"  # host ports (S3) forwarded into the namespace appear here
POD_CIDR = "10.88.0.0/16"
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
TMPFS = ("/run/netns", "/run/containerd", "/var/lib/cni", "/var/log/containers")
POD_LOGS = "/var/log/pods"  # bind-mounted from <workdir>/pod-logs: kept for post-mortems
CGROUP_FS = Path("/sys/fs/cgroup")


class Namespace:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.holder: subprocess.Popen[bytes] | None = None
        self.cgroups: list[str] = []  # cgroup paths (relative to each hierarchy) to clean on stop

    @property
    def pod_logs_dir(self) -> Path:
        """The host directory mounted at the namespace's /var/log/pods (the kubelet's CRI logs)."""
        return self.dir / "pod-logs"

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (*TMPFS, POD_LOGS):  # mount points must exist; the mounts themselves are private
            Path(d).mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
            start_new_session=True,
        )
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.pid}/ns/net") == mine:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("unshare --net --mount failed (needs root)")
            time.sleep(0.02)
        sysctl = self.dir / "sysctl"
        sysctl.mkdir(exist_ok=True)
        lines = ["set -e", "ip link set lo up"]
        lines += [f"ip addr add {ip}/32 dev lo" for ip in (NODE_IP, KUBERNETES_IP, DNS_IP, HOST_SERVICES_IP)]
        for f in SYSCTLS:
            copy = sysctl / f.replace("/", "_")
            copy.write_text(Path("/proc/sys", f).read_text())
            lines.append(f"mount --bind {copy} /proc/sys/{f}")
        lines += [f"mount -t tmpfs tmpfs {d}" for d in TMPFS]
        (self.dir / "pod-logs").mkdir(exist_ok=True)
        lines.append(f"mount --bind {self.dir / 'pod-logs'} {POD_LOGS}")
        self.run(["sh", "-c", "\n".join(lines)])

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--", *argv]

    def run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(argv), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} (in the node namespace) failed: {r.stdout}{r.stderr}")
        return r  # type: ignore[no-any-return]

    # -- teardown ----------------------------------------------------------------------
    def _members(self) -> list[int]:
        """Processes in this mount namespace (containerd, shims, kubelet, ...), holder excluded."""
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
        except OSError:
            return []
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != self.pid:
                try:
                    if os.readlink(p / "ns" / "mnt") == ns:
                        out.append(int(p.name))
                except OSError:
                    pass
        return out

    def stop(self) -> list[str]:
        """Kill everything inside, remove the cgroups, end the namespace. Returns what was left behind."""
        problems: list[str] = []
        if self.holder is None:
            return problems
        left = kill_all(lambda: self._members() + cgroup_pids(self.cgroups))
        if left:
            problems.append(f"processes still alive: {left}")
        problems += remove_cgroups(self.cgroups)
        self.holder.kill()
        self.holder.wait()
        self.holder = None
        return problems


def hierarchies() -> list[Path]:
    """Every mounted cgroup v1 hierarchy (cpu, memory, pids, ...), or the v2 root."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())


def _tree(roots: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for h in hierarchies():
        for r in roots:
            top = h / r.strip("/")
            if top.is_dir():
                out += [Path(d) for d, _, _ in os.walk(top)]
    return out


def kill_all(pids: Callable[[], list[int]], tries: int = 50) -> list[int]:
    """SIGKILL what `pids()` lists until it lists nothing (every 0.1 s, `tries` times): what is still alive."""
    for _ in range(tries):
        alive = pids()
        if not alive:
            return []
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return pids()


def cgroup_pids(roots: Iterable[str]) -> list[int]:
    pids: set[int] = set()
    for d in _tree(roots):
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except OSError:
            pass
    return sorted(pids)


def remove_cgroups(roots: Iterable[str]) -> list[str]:
    """rmdir every cgroup under the roots, deepest first (retrying while they drain)."""
    left: list[Path] = []
    for _ in range(30):
        left = []
        for d in sorted(_tree(roots), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        if not left:
            return []
        time.sleep(0.2)
    return [f"cgroups not removed: {[str(p) for p in left[:5]]}"]


def make_cgroup(root: str) -> None:
    """Create `root` in every hierarchy (cpuset needs cpus/mems copied from its parent)."""
    for h in hierarchies():
        d = h / root.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        if h.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (d / f).read_text().strip():
                    (d / f).write_text((h / f).read_text())


# -- more nodes: one network namespace each, wired to the cluster's namespace ------------------------
NODES_BRIDGE = "kt-nodes"  # in the cluster's namespace: the nodes' shared link (a switch)
NODES_GATEWAY = "10.2.0.1"  # the cluster namespace's address on it (control plane, node 1, CoreDNS)


def node_ip(index: int) -> str:
    """Node `index`'s InternalIP: node 1 is the cluster namespace's own NODE_IP, node N >= 2 is 10.2.0.N."""
    return NODE_IP if index == 1 else f"10.2.0.{index}"


def pod_cidr(index: int) -> str:
    """Node `index`'s pod CIDR: node 1 keeps 10.88.0.0/16, node N >= 2 gets 10.(87+N).0.0/16."""
    return POD_CIDR if index == 1 else f"10.{87 + index}.0.0/16"


class NodeNet:
    """A network namespace of its own for node `index` (>= 2), inside the cluster's mount namespace.

    Wired like a flat L2 cluster with host routes (flannel's host-gw): a veth from the node's `eth0`
    (node_ip(index)/24) to the bridge `kt-nodes` in the cluster namespace (10.2.0.1); the default
    route goes to the cluster namespace (API server at the `kubernetes` ClusterIP 10.0.0.1, CoreDNS at
    10.0.0.10, host services at 10.0.0.20, node 1's pods); every other node's pod CIDR is routed
    straight to that node. No NAT: pods see each other's pod IPs. IP forwarding is switched on in
    these namespaces only (net.* sysctls are per network namespace). Everything goes with the
    namespace: `stop()` kills the holder, Namespace.stop() the rest."""

    def __init__(self, ns: Namespace, index: int, peers: Sequence[NodeNet] = ()) -> None:
        assert index >= 2, "node 1 is the cluster namespace itself"
        self.ns, self.index, self.peers = ns, index, list(peers)
        self.ip, self.cidr = node_ip(index), pod_cidr(index)
        self.veth = f"kt-n{index}"
        self.holder: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def start(self) -> None:
        self.holder = subprocess.Popen(
            self.ns.argv(["unshare", "--net", "--", "sleep", "infinity"]), start_new_session=True
        )
        # the holder's own namespace: neither ours (nsenter has not entered the cluster's yet) nor the cluster's
        # (unshare has not run yet); moving eth0 into either would leave the node without it
        before = {os.readlink(f"/proc/{self.ns.pid}/ns/net"), os.readlink("/proc/self/ns/net")}
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/net") not in before:
                    break
            except OSError:
                pass
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"unshare --net for node {self.index} failed")
            time.sleep(0.02)
        bridge = (
            f"ip link show {NODES_BRIDGE} >/dev/null 2>&1 || {{ ip link add {NODES_BRIDGE} type bridge &&"
            f" ip addr add {NODES_GATEWAY}/24 dev {NODES_BRIDGE} && ip link set {NODES_BRIDGE} up; }}"
        )
        self.ns.run(["sh", "-c", "\n".join([
            "set -e",
            bridge,
            "echo 1 > /proc/sys/net/ipv4/ip_forward",  # this network namespace's value, not the host's
            f"ip link add {self.veth} type veth peer name eth0 netns {self.pid}",
            f"ip link set {self.veth} master {NODES_BRIDGE} up",
            f"ip route add {self.cidr} via {self.ip}",
        ])])  # fmt: skip
        lines = [
            "set -e",
            "ip link set lo up",
            f"ip addr add {self.ip}/24 dev eth0",
            "ip link set eth0 up",
            f"ip route add default via {NODES_GATEWAY}",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]
        lines += [f"ip route add {p.cidr} via {p.ip}" for p in self.peers]
        self.run(["sh", "-c", "\n".join(lines)])
        for p in self.peers:
            p.run(["ip", "route", "add", self.cidr, "via", self.ip])

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this node's network namespace (and the cluster's mount namespace)."""
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--", *argv]

    def run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(argv), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} (in node {self.index}'s namespace) failed: {r.stdout}{r.stderr}"
            )
        return r  # type: ignore[no-any-return]

    def unplug(self) -> None:
        """Pull the cable: the node's link goes down, no packet leaves or reaches it (no FIN, no RST)."""
        self.run(["ip", "link", "set", "eth0", "down"])

    def stop(self) -> None:
        """End the namespace (its veth goes with it; the routes through it with the veth)."""
        if self.holder is None:
            return
        subprocess.run(self.ns.argv(["ip", "link", "del", self.veth]), capture_output=True)
        for p in self.peers:
            if p.holder is not None:
                subprocess.run(p.argv(["ip", "route", "del", self.cidr]), capture_output=True)
        self.holder.kill()
        self.holder.wait()
        self.holder = None
