"""The real node's teardown leaves nothing behind, even when the test fails.

Its own small cluster (not the session's): a Namespace, the control plane, a KubeletNode with only
the pause image (a fresh containerd root), one bridge-network pod. The test body raises inside
`with cluster, node:`; after the context managers have torn everything down, nothing the run
started or changed may be left on the host: no process that was in the node's namespaces or
cgroups (containerd, shims, the kubelet, the pod's processes, the control plane, the forwarders),
no cgroup under the node's cgroupRoot, no mount, no interface or address, no changed sysctl, and
`cluster.leftovers == []`. While the pod runs the test first checks that those things do exist
inside the namespace (cni0 + veth, overlay and tmpfs mounts, the kubelet's sysctl values), so the
host-side checks cannot pass by looking at nothing.

    KUBETUNE_E2E_NODE=kubelet flock /tmp/kubetune-e2e-kubelet.lock .venv/bin/pytest e2e/test_teardown.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import binaries
from harness.cluster import KUBECTL, Cluster
from harness.images import PAUSE_IMAGE
from harness.kubelet_node import KubeletNode, _debian_binaries
from harness.mode import NODE_MODE
from harness.netns import POD_CIDR, Namespace, hierarchies

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE_MODE != "kubelet",
        reason="KUBETUNE_E2E_NODE=agent: the real node is not started in the fast mode",
    ),
]
# the kubelet sets these at start (inside the namespace they are bind-mounted plain files)
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
NS_KINDS = ("net", "mnt", "pid")
# every component the run starts; comm is cut at 15 characters (containerd-shim-runc-v2)
EXPECTED = {
    "etcd",
    "kube-apiserver",
    "kube-controller",
    "containerd",
    "containerd-shim",
    "kubelet",
    "kube-scheduler",
    "coredns",
    "pause",
}


class Boom(Exception):
    """The failure the test body raises on purpose."""


# -- what the host looks like ----------------------------------------------------------------


def mounts(mountinfo: str = "/proc/self/mountinfo") -> Counter[tuple[str, ...]]:
    """(root, mount point, fs type, source) of every mount: ids and peer groups left out."""
    out: Counter[tuple[str, ...]] = Counter()
    for line in Path(mountinfo).read_text().splitlines():
        left, right = line.split(" - ", 1)
        f, r = left.split(), right.split()
        out[(f[3], f[4], r[0], r[1])] += 1
    return out


def ip(*args: str, argv: tuple[str, ...] = ()) -> str:
    return subprocess.run([*argv, "ip", "-o", *args], check=True, capture_output=True, text=True).stdout


def links(argv: tuple[str, ...] = ()) -> list[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in ip("link", argv=argv).splitlines())


def sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS}


def e2e_cgroups() -> set[Path]:
    """The cgroupRoots of this pytest process's nodes (other sessions on the machine have their own)."""
    return {p for h in hierarchies() for p in h.glob(f"kubetune-e2e-{os.getpid()}-*")}


def host_state() -> dict[str, object]:
    return {
        "mounts": mounts(),
        "addrs": ip("addr"),
        "links": links(),
        "sysctls": sysctls(),
        "cgroups": e2e_cgroups(),
    }


def stat(pid: int) -> tuple[str, str, str] | None:
    """(comm, state, start time) of a live process, None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return comm, rest[0], rest[19]


def ns_ids(pid: int) -> set[str]:
    out = set()
    for kind in NS_KINDS:
        try:
            out.add(os.readlink(f"/proc/{pid}/ns/{kind}"))
        except OSError:
            pass
    return out


def processes_in(namespaces: set[str]) -> dict[int, tuple[str, str, str]]:
    """Every process with one of its net/mnt/pid namespaces in `namespaces`."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and ns_ids(int(p.name)) & namespaces:
            s = stat(int(p.name))
            if s is not None:
                out[int(p.name)] = s
    return out


def cgroup_pids(root: str) -> set[int]:
    pids: set[int] = set()
    for h in hierarchies():
        for d, _, _ in os.walk(h / root.strip("/")):
            try:
                pids.update(int(x) for x in Path(d, "cgroup.procs").read_text().split())
            except OSError:
                pass
    return pids


# -- the test --------------------------------------------------------------------------------


def test_teardown_after_a_failing_test_leaves_nothing_behind(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the real node needs root (unshare --net --mount, cgroups)")
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip(f"kubectl not found at {KUBECTL} (set KUBETUNE_E2E_KUBECTL)")
    try:
        _debian_binaries()
        binaries.ensure(
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kubelet",
            "kube-scheduler",
            "coredns",
            "pause",
        )
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))

    before = host_state()
    mine = ns_ids(os.getpid())
    cluster = Cluster(tmp_path / "cluster", ns=Namespace(tmp_path / "netns"))
    node = KubeletNode(cluster, tmp_path / "node", pause_only=True)
    seen: dict[int, tuple[str, str, str]] = {}  # every process of the run: pid -> (comm, state, start time)
    namespaces: set[str] = set()
    t0 = time.monotonic()
    timings = {}
    with pytest.raises(Boom, match="on purpose"), cluster, node:
        assert cluster.ns is not None
        timings["up"] = time.monotonic() - t0
        cluster.admin.post(
            "/api/v1/namespaces/default/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "sleeper"},
                "spec": {
                    "terminationGracePeriodSeconds": 30,  # teardown does not wait for it
                    "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
                },
            },
        )
        pod = cluster.admin.wait_for(
            "/api/v1/namespaces/default/pods/sleeper",
            lambda p: p.get("status", {}).get("phase") == "Running",
            timeout=90,
        )
        timings["pod Running"] = time.monotonic() - t0
        assert pod["status"]["podIP"].startswith(POD_CIDR.split(".0.0/")[0] + "."), pod[
            "status"
        ]  # bridge network

        # everything the run started: the namespace's members, its cgroups' processes (the pod's),
        # and the namespaces of all of them (the pod's own net/mnt/pid namespaces)
        holder = cluster.ns.pid
        namespaces = ns_ids(holder) - mine
        pids = cgroup_pids(node.cgroup_root)
        task = node.task_pid("default", "sleeper")
        assert task in pids, (task, pids)
        for pid in pids:
            namespaces |= ns_ids(pid) - mine
        assert not mine & namespaces
        seen = processes_in(namespaces)
        for pid in pids | {holder} | {p.popen.pid for p in (*cluster.procs, *node.procs)}:
            s = stat(pid)
            if s is not None:
                seen[pid] = s
        comms = Counter(c for c, _, _ in seen.values())
        assert EXPECTED <= set(comms), comms
        assert comms["pause"] >= 2, comms  # the sandbox and the pod's container

        # what the node changed exists, but only inside the namespace
        ns_argv = tuple(cluster.ns.argv([]))
        ns_links = links(ns_argv)
        assert "cni0" in ns_links and any(x.startswith("veth") for x in ns_links), ns_links
        ns_mounts = mounts(f"/proc/{holder}/mountinfo")
        assert any(fs == "overlay" for _, _, fs, _ in ns_mounts), ns_mounts
        assert any(mp == "/run/containerd" and fs == "tmpfs" for _, mp, fs, _ in ns_mounts), ns_mounts
        ns_sysctls = {k: cluster.ns.run(["cat", f"/proc/sys/{k}"]).stdout.strip() for k in KUBELET_SYSCTLS}
        assert ns_sysctls == KUBELET_SYSCTLS
        assert [
            p
            for p in (Path(h) / node.cgroup_root.strip("/") / "kubepods" for h in hierarchies())
            if p.is_dir()
        ], "no kubepods cgroup under the node's cgroupRoot"
        during = host_state()
        during["cgroups"] = before["cgroups"]  # the node's own cgroupRoot is new, by design
        assert during == before, "the host changed while the node ran"
        timings["checked"] = time.monotonic() - t0
        raise Boom("on purpose: the test body fails with the pod still running")
    timings["torn down"] = time.monotonic() - t0
    print("teardown test: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), file=sys.stderr)

    assert cluster.leftovers == []

    def left() -> dict[int, tuple[str, str, str]]:
        return {
            pid: s
            for pid, (comm, _, start) in seen.items()
            if (s := stat(pid)) and (s[0], s[2]) == (comm, start)
        }

    running = {pid: s for pid, s in left().items() if s[1] != "Z"}
    assert not running, f"processes of the run still running (comm, state, start): {running}"
    # killed daemons (the shims) were reparented to PID 1: dead, but their entries go when it reaps them
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), f"processes of the run never reaped: {left()}"
    assert not processes_in(namespaces), "processes still in the run's namespaces"
    assert not [p for h in hierarchies() if (p := h / node.cgroup_root.strip("/")).exists()], (
        f"cgroup {node.cgroup_root} left behind"
    )
    after = host_state()
    assert after["cgroups"] <= before["cgroups"], f"new cgroups: {after['cgroups'] - before['cgroups']}"  # type: ignore[operator]
    for key in ("mounts", "addrs", "links", "sysctls"):
        assert after[key] == before[key], f"host {key} changed: before {before[key]}, after {after[key]}"
    assert "cni0" not in after["links"]  # type: ignore[operator]
