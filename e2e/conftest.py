"""Session fixtures for the end-to-end suite: a real control plane, the node agent, S3, an OCI registry.

    .venv/bin/pytest e2e -m e2e

Environment:
  KUBETUNE_E2E_BUILD=0      never build; skip when the binaries are not cached
  KUBETUNE_E2E_CACHE=DIR    binary cache (default ~/.cache/kubetune-e2e)
  KUBETUNE_E2E_WORKDIR=DIR  keep certs, kubeconfigs, logs and pod dirs there (default: pytest tmp)
  KUBETUNE_E2E_S3=moto      use moto instead of MinIO (accepts any credentials)
  KUBETUNE_E2E_NODE=kubelet (default) the control plane runs in a private network + mount namespace
                            with a real node (containerd, kubelet, kube-scheduler, CoreDNS: `kubelet_node`);
                            `agent`: the fast mode, on the host's loopback with the node agent
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import binaries
from harness.cluster import KUBECTL, Cluster
from harness.mode import NODE_MODE
from harness.node_agent import NodeAgent, for_cluster
from harness.registry import Registry
from harness.s3 import S3Server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against a real API server (slow start)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers", "core: the suite's core tests, run on both nodes in every CI run (e2e/test_node_parity.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
    # test_local_cluster.py first among the e2e tests: its `make cluster` takes the cached containerd root (images
    # imported), which the session's node holds from its start to the session's end
    e2e = [i for i, item in enumerate(items) if here in Path(str(item.fspath)).parents]
    if e2e:
        first = [item for item in items if Path(str(item.fspath)).name == "test_local_cluster.py"]
        rest = [item for item in items[e2e[0] :] if item not in first]
        items[e2e[0] :] = first + rest


@pytest.fixture(scope="session")
def e2e_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = os.environ.get("KUBETUNE_E2E_WORKDIR")
    if d:
        p = Path(d) / uuid.uuid4().hex[:8]
        p.mkdir(parents=True)
        return p
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def cluster(e2e_workdir: Path) -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager on loopback (admin kubeconfig)."""
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip(f"kubectl not found at {KUBECTL} (set KUBETUNE_E2E_KUBECTL)")
    try:
        binaries.ensure("etcd", "kube-apiserver", "kube-controller-manager")
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))
    ns = None
    if NODE_MODE == "kubelet":
        from harness.netns import Namespace  # noqa: PLC0415

        ns = Namespace(e2e_workdir / "netns")
    c = Cluster(e2e_workdir / "cluster", ns=ns)
    try:
        c.start()
    except Exception:
        for name, tail in c.logs().items():
            print(f"--- {name} ---\n{tail}", file=sys.stderr)
        c.stop()
        raise
    yield c
    c.stop()
    if c.leftovers:  # an error at the session's last teardown, not a line on stderr nobody reads
        pytest.fail("e2e teardown left behind: " + "; ".join(c.leftovers))


@pytest.fixture(scope="session")
def node_agent(cluster: Cluster, e2e_workdir: Path) -> Iterator[NodeAgent]:
    """The fake kubelet/scheduler/DNS for one node; pods run as local processes."""
    if NODE_MODE == "kubelet":
        pytest.skip("runs on the node agent only (the fast mode): KUBETUNE_E2E_NODE=agent")
    if not os.access("/etc/hosts", os.W_OK):
        pytest.skip(
            "the node agent publishes pod DNS names in /etc/hosts and needs to write it (run as root)"
        )
    agent = for_cluster(cluster, e2e_workdir / "node")
    agent.start()
    yield agent
    agent.stop()
    if agent.errors:
        print("node agent errors:\n" + "\n".join(agent.errors[-20:]), file=sys.stderr)


@pytest.fixture(scope="session")
def kubelet_node(cluster: Cluster, e2e_workdir: Path) -> Iterator[Any]:
    """A real node: containerd + kubelet + kube-scheduler + CoreDNS, images built from this repo."""
    if NODE_MODE != "kubelet":
        pytest.skip("KUBETUNE_E2E_NODE=agent: the real node (kubelet) is not started in the fast mode")
    from harness.kubelet_node import KubeletNode  # noqa: PLC0415

    node = KubeletNode(cluster, e2e_workdir / "kubelet-node")
    try:
        node.start()
    except binaries.BinariesUnavailable as e:
        node.stop()
        pytest.skip(str(e))
    except Exception:
        for name, tail in node.component_logs().items():
            print(f"--- {name} ---\n{tail}", file=sys.stderr)
        node.stop()
        raise
    yield node
    node.stop()


class MultiNode:
    """The session's cluster with more real nodes: `nodes[0]` is the session's `kubelet_node` (node 1,
    which also runs kube-scheduler and CoreDNS for the cluster), `nodes[1:]` the extra ones, each in a
    network namespace of its own with its own pod CIDR (netns.NodeNet, kubelet_node.KubeletNode(first=)).
    `started_s`: seconds it took to add the extra nodes (Ready)."""

    def __init__(self, cluster: Cluster, nodes: list[Any], started_s: float) -> None:
        self.cluster, self.nodes, self.started_s = cluster, nodes, started_s

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Any:
        return next(n for n in self.nodes if n.name == name)

    def ready(self) -> dict[str, bool]:
        """Each node's Ready condition, as the node lifecycle controller keeps it."""
        out = {}
        for n in self.nodes:
            got = self.cluster.admin.get_or_none(f"/api/v1/nodes/{n.name}") or {}
            conds = {c["type"]: c["status"] for c in (got.get("status") or {}).get("conditions") or []}
            out[n.name] = conds.get("Ready") == "True"
        return out


@pytest.fixture(scope="module")
def multinode_cluster(
    request: pytest.FixtureRequest, cluster: Cluster, kubelet_node: Any, e2e_workdir: Path
) -> Iterator[MultiNode]:
    """The session's cluster with `NODES` real nodes (a module-level constant of the test module, default
    2): the session's node plus NODES-1 extra ones, added for the module and removed after it (their
    processes, mounts, cgroups, network namespaces, copies of the containerd root and Node objects; the
    teardown fails if anything is left). Real node only (KUBETUNE_E2E_NODE=kubelet). Request session fixtures
    that start pods (the suite's `operator`) before it, or those pods may land on an extra node."""
    from harness.kubelet_node import KubeletNode  # noqa: PLC0415

    count = int(getattr(request.module, "NODES", 2))
    t0 = time.monotonic()
    extra: list[Any] = []
    try:
        for i in range(2, count + 1):
            n = KubeletNode(cluster, e2e_workdir / f"node{i}-{uuid.uuid4().hex[:6]}", f"e2e-node-{i}",
                            first=kubelet_node, index=i, peers=tuple(extra))  # fmt: skip
            extra.append(n)
            n.start()
    except Exception:
        for n in extra:
            for name, tail in n.component_logs().items():
                print(f"--- {n.name} {name} ---\n{tail}", file=sys.stderr)
        for n in reversed(extra):
            n.stop()
        raise
    mn = MultiNode(cluster, [kubelet_node, *extra], time.monotonic() - t0)
    print(f"\n[multinode] {len(extra)} extra node(s) Ready in {mn.started_s:.1f}s", file=sys.stderr)
    yield mn
    t1 = time.monotonic()
    left: list[str] = []
    for n in reversed(extra):
        n.stop()
        left += n.leftovers
        cluster.admin.delete(f"/api/v1/nodes/{n.name}")
    print(f"[multinode] extra nodes removed in {time.monotonic() - t1:.1f}s", file=sys.stderr)
    if left:
        pytest.fail("multinode teardown left behind: " + "; ".join(left))


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest) -> Any:
    """The node pods run on, in either mode (`node_agent` or `kubelet_node`), with the same calls:
    `.name`, `.kill_container(ns, pod, container=None, sig=SIGKILL)`, `.logs(ns, pod, container=None)`,
    `.pod_logs(ns, name_prefix)` (deleted pods too), `.pod_endpoint(host_port)` (how pods reach a host port)."""
    return request.getfixturevalue("kubelet_node" if NODE_MODE == "kubelet" else "node_agent")


@pytest.fixture(scope="session")
def s3(e2e_workdir: Path) -> Iterator[S3Server]:
    """A loopback S3 server (MinIO) with a bucket; `.env()` gives the AWS_* variables."""
    kind = os.environ.get("KUBETUNE_E2E_S3")
    if kind is None:
        try:
            binaries.ensure("minio")
            kind = "minio"
        except binaries.BinariesUnavailable:
            kind = "moto"
    server = S3Server(e2e_workdir / "s3", kind=kind)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry(e2e_workdir: Path) -> Iterator[Registry]:
    """The CNCF distribution registry on loopback (plain HTTP, htpasswd auth): `.host`, `.secret()`, `.client()`."""
    try:
        server = Registry(e2e_workdir / "registry").start()
    except binaries.BinariesUnavailable as e:
        pytest.skip(str(e))
    yield server
    server.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace (with its `default` ServiceAccount), deleted afterwards."""
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
