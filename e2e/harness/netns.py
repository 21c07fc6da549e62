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
from collections.abc import Iterable, Sequence
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
        for _ in range(50):
            pids = self._members() + cgroup_pids(self.cgroups)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        else:
            problems.append(f"processes still alive: {self._members() + cgroup_pids(self.cgroups)}")
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
