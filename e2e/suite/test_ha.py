"""Two operator replicas with leader election (the chart's Lease, RBAC and ServiceAccount), against the
real API server:

1. the leader is killed with SIGKILL in the middle of a burst of FineTuneJobs (suspended: no pods): the
   standby takes the Lease once it has stood still for its duration and finishes the burst;
2. a rolling update: a new replica starts, the leader gets SIGTERM mid-burst, releases the Lease, and
   a standby leads within a retry period.

With the node agent the replicas are `kubetune operator --leader-elect` processes under the chart
ServiceAccount's token (a shorter lease); on the real node they are the chart's Deployment scaled to two
pods of the operator image (the chart's lease timings): its leader's container SIGKILLed, then
`kubectl rollout restart` (maxSurge 1, maxUnavailable 0), then scaled back to one.

Every FineTuneJob ends with exactly one workload Job (listed by the owner label): none lost, none twice.
Prints both takeover times."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest
from conftest import HA_NAMESPACE, NODE_MODE, RELEASE_NS, Operator, empty_namespace, job_doc, wait_for
from harness.cluster import KUBECTL
from harness.procs import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS = HA_NAMESPACE
FIRST, SECOND = 30, 10
LEASE, RENEW, RETRY = 8, 5, 1  # shorter than the chart's 15/10/2 to keep the test lean
FTJ_PATH = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"


class Replica(Operator):
    def __init__(self, installed: dict[str, Any], log: Any) -> None:
        chart_env = {e["name"]: e["value"] for e in installed["deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"].startswith("KUBETUNE_LEADER_ELECT") and "value" in e}  # fmt: skip
        self.metrics_port = free_port()
        super().__init__(
            installed["kubeconfig"], log, namespaces=(NS,), args=("--leader-elect", "--metrics-port", str(self.metrics_port)),
            env={**chart_env, "KUBETUNE_LEADER_ELECT_NAMESPACE": RELEASE_NS, "KUBETUNE_LEADER_ELECT_LEASE_DURATION": str(LEASE),
                 "KUBETUNE_LEADER_ELECT_RENEW_DEADLINE": str(RENEW), "KUBETUNE_LEADER_ELECT_RETRY_PERIOD": str(RETRY)},
        )  # fmt: skip
        self.lease_name = chart_env["KUBETUNE_LEADER_ELECT_LEASE_NAME"]

    def leads(self) -> bool:
        """kubetune_leader from this replica's /metrics."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                m = re.search(r"^kubetune_leader (\S+)$", r.read().decode(), re.M)
        except OSError:
            return False
        return m is not None and float(m[1]) == 1.0


def lease(cluster: Any, name: str) -> dict[str, Any]:
    obj = cluster.admin.get_or_none(f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NS}/leases/{name}")
    return (obj or {}).get("spec") or {}


def workloads(kctl: Any) -> dict[str, list[dict[str, Any]]]:
    """FineTuneJob name -> its workload Jobs, by the owner label."""
    out: dict[str, list[dict[str, Any]]] = {}
    for job in kctl.get(NS, "jobs") or []:
        out.setdefault(job["metadata"]["labels"]["kubetune.io/job-name"], []).append(job)
    return out


class Burst(threading.Thread):
    """POSTs the FineTuneJobs one by one, `gap` seconds apart; `.posted` counts them. With `hold=(n, event)`
    it waits for the event after the first n."""

    def __init__(self, cluster: Any, docs: list[dict[str, Any]], gap: float = 0.15,
                 hold: tuple[int, threading.Event] | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.cluster, self.docs, self.gap, self.hold, self.posted = cluster, docs, gap, hold, 0
        self.start()

    def run(self) -> None:
        for doc in self.docs:
            if self.hold is not None and self.posted == self.hold[0]:
                self.hold[1].wait(300)
            self.cluster.admin.post(FTJ_PATH, doc)
            self.posted += 1
            time.sleep(self.gap)


def new_holder(cluster: Any, name: str, old: str, since: float) -> float:
    """Seconds from `since` until the Lease names a holder other than `old`."""
    wait_for("a new leader", lambda: lease(cluster, name).get("holderIdentity") not in (None, old), 60, 0.1)
    return time.monotonic() - since


def assert_exactly_once(kctl: Any, names: list[str]) -> None:
    wait_for(f"{len(names)} workloads", lambda: set(workloads(kctl)) >= set(names), 120, 0.5)
    got = workloads(kctl)
    assert sorted(got) == sorted(names)
    twice = {n: [j["metadata"]["name"] for j in js] for n, js in got.items() if len(js) != 1}
    assert not twice, f"FineTuneJobs with more than one workload Job: {twice}"
    uids = {f["metadata"]["name"]: f["metadata"]["uid"] for f in kctl.get(NS, "ftj")}
    for name, [job] in got.items():
        assert (
            job["metadata"]["name"] == f"{name}-r0"
            and job["metadata"]["ownerReferences"][0]["uid"] == uids[name]
        )
    wait_for("every job Suspended", lambda: all((f.get("status") or {}).get("phase") == "Suspended"
                                                for f in kctl.get(NS, "ftj")), 120, 1)  # fmt: skip


@pytest.mark.skipif(NODE_MODE == "kubelet", reason="the real node runs test_deployment_replicas_* instead")
def test_killing_the_leader_mid_burst_loses_no_workload(cluster, kctl, installed, s3, s3_data, e2e_workdir):
    docs = [
        job_doc(f"ha-{i:02d}", s3, s3_data, steps=5, **{"runPolicy.suspend": True})
        for i in range(FIRST + SECOND)
    ]
    names = [d["metadata"]["name"] for d in docs]
    a, b, c = (Replica(installed, e2e_workdir / f"ha-operator-{x}.log") for x in "abc")
    empty_namespace(kctl, NS)
    try:
        a.start()
        wait_for("a leads", a.leads, 30, 0.2)
        b.start()
        assert not b.leads()
        first = lease(cluster, a.lease_name)["holderIdentity"]

        # 1. SIGKILL the leader once it has created some of the burst's workloads.
        posting = Burst(cluster, docs[:FIRST])
        wait_for("the leader at work", lambda: len(workloads(kctl)) >= 6, 60, 0.1)
        a.kill()
        killed_at = time.monotonic()
        at_kill = (posting.posted, len(workloads(kctl)))
        assert at_kill[0] < FIRST, "the burst ended before the kill: nothing to take over"
        takeover = new_holder(cluster, a.lease_name, first, killed_at)
        wait_for("b reports it leads", b.leads, 10, 0.1)
        posting.join()
        assert_exactly_once(kctl, names[:FIRST])
        all_after = time.monotonic() - killed_at
        assert takeover <= LEASE + 4 * RETRY + 10, (
            takeover
        )  # the lease duration, a retry, the API server's latency

        # 2. A rolling update: a new replica stands by, the leader gets SIGTERM mid-burst and hands over.
        c.start()
        assert not c.leads()
        second = lease(cluster, a.lease_name)["holderIdentity"]
        before = len(workloads(kctl))
        posting = Burst(cluster, docs[FIRST:])
        wait_for("the leader at work", lambda: len(workloads(kctl)) >= before + 2, 60, 0.1)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGTERM)
        termed_at = time.monotonic()
        handover = new_holder(cluster, a.lease_name, second, termed_at)
        assert b.proc.wait(timeout=30) == 0
        wait_for("c reports it leads", c.leads, 10, 0.1)
        posting.join()
        assert_exactly_once(kctl, names)
        assert handover < LEASE, (
            f"a released Lease is taken within a retry period, not a lease duration: {handover:.1f}s"
        )
        assert lease(cluster, a.lease_name)["leaseTransitions"] == 2

        log_b, log_c = b.log.read_text(), c.log.read_text()
        assert "acquired lease" in log_b and "released lease" in log_b and "acquired lease" in log_c
        assert not b.errors() and not c.errors()
        print(f"\n[ha] SIGKILL of the leader with {at_kill[0]}/{FIRST} FineTuneJobs posted and {at_kill[1]} workloads created: "
              f"the standby led {takeover:.1f}s later (lease {LEASE}s, retry {RETRY}s); "
              f"all {FIRST} workloads, each once, {all_after:.1f}s after the kill\n"
              f"[ha] SIGTERM of the leader (rolling update): the next replica led {handover:.1f}s later; "
              f"all {FIRST + SECOND} workloads each once", file=sys.stderr)  # fmt: skip
    except BaseException:
        for op in (a, b, c):
            print(f"--- {op.log.name} ---\n{op.tail(4000) if op.log.exists() else ''}", file=sys.stderr)
        raise
    finally:
        for op in (a, b, c):
            op.stop()
        empty_namespace(kctl, NS)


# ---------------------------------------------------------------- the real node: the chart's Deployment


class Replicas:
    """The chart's operator Deployment (KUBETUNE_E2E_NODE=kubelet) seen through its pods and its Lease."""

    def __init__(self, cluster: Any, kctl: Any, deployment: dict[str, Any]) -> None:
        self.cluster, self.kctl, self.name = cluster, kctl, deployment["metadata"]["name"]
        env = {
            e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        self.lease_name = env["KUBETUNE_LEADER_ELECT_LEASE_NAME"]
        self.duration = float(env["KUBETUNE_LEADER_ELECT_LEASE_DURATION"])
        self.retry = float(env["KUBETUNE_LEADER_ELECT_RETRY_PERIOD"])
        labels = deployment["spec"]["selector"]["matchLabels"]
        self.selector = "-l=" + ",".join(f"{k}={v}" for k, v in labels.items())

    def pods(self) -> list[dict[str, Any]]:
        return self.kctl.get(RELEASE_NS, "pods", None, self.selector) or []

    def ready(self) -> list[str]:
        return [
            p["metadata"]["name"]
            for p in self.pods()
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []
            )
        ]

    def holder(self) -> str | None:
        return lease(self.cluster, self.lease_name).get("holderIdentity")

    def leader(self) -> str | None:
        """The leading pod's name (holderIdentity is `<pod name>_<random suffix>`)."""
        holder = self.holder()
        return holder.rsplit("_", 1)[0] if holder else None

    def settled(self, n: int) -> bool:
        """n Ready pods, all of the current template, one of them leading."""
        dep = self.kctl.get(RELEASE_NS, "deployment", self.name) or {}
        st = dep.get("status") or {}
        ready = self.ready()
        return (len(self.pods()) == n == len(ready) and st.get("updatedReplicas") == n == st.get("readyReplicas")
                and self.leader() in ready)  # fmt: skip

    def scale(self, n: int, timeout: float = 240) -> None:
        self.kctl("-n", RELEASE_NS, "scale", f"deployment/{self.name}", f"--replicas={n}")
        wait_for(f"{n} operator pod(s) Ready, one leading", lambda: self.settled(n), timeout, 1)

    def terminating(self, pod: str) -> bool:
        got = self.kctl.get(RELEASE_NS, "pod", pod)
        return got is None or bool(got["metadata"].get("deletionTimestamp"))


@pytest.mark.skipif(NODE_MODE != "kubelet", reason="the chart's Deployment runs only on the real node "
                    "(KUBETUNE_E2E_NODE=kubelet); the node agent runs the replicas as processes")  # fmt: skip
def test_deployment_replicas_hand_over_mid_burst(
    cluster, kctl, installed, operator, node, s3, s3_data, e2e_workdir
):
    docs = [
        job_doc(f"ha-{i:02d}", s3, s3_data, steps=5, **{"runPolicy.suspend": True})
        for i in range(FIRST + SECOND)
    ]
    names = [d["metadata"]["name"] for d in docs]
    dep = Replicas(cluster, kctl, installed["deployment"])
    empty_namespace(kctl, NS)
    transitions = lease(cluster, dep.lease_name).get("leaseTransitions", 0)
    follow: subprocess.Popen[bytes] | None = None
    try:
        dep.scale(2)
        first, leader = dep.holder(), dep.leader()
        assert first and leader
        standby = next(p for p in dep.ready() if p != leader)

        # 1. SIGKILL the leader's container (a crash: no release) once it has created some of the burst's workloads.
        posting = Burst(cluster, docs[:FIRST])
        wait_for("the leader at work", lambda: len(workloads(kctl)) >= 6, 60, 0.1)
        node.kill_container(RELEASE_NS, leader)
        killed_at = time.monotonic()
        at_kill = (posting.posted, len(workloads(kctl)))
        assert at_kill[0] < FIRST, "the burst ended before the kill: nothing to take over"
        takeover = new_holder(cluster, dep.lease_name, first, killed_at)
        # Usually the standby; the killed pod's restarted container is a candidate too, but it saw the Lease later.
        took = dep.leader()
        posting.join()
        assert_exactly_once(kctl, names[:FIRST])
        all_after = time.monotonic() - killed_at
        assert takeover >= dep.duration - dep.retry - 1, (
            f"the Lease was taken before it expired: {takeover:.1f}s"
        )
        assert takeover <= dep.duration + 4 * dep.retry + 10, takeover
        assert took is not None and "acquired lease" in node.logs(RELEASE_NS, took)

        # 2. A rolling update mid-burst: each old pod gets SIGTERM once a new one is Ready; the leader releases.
        wait_for("the killed container back, one leader", lambda: dep.settled(2), 120, 1)
        second, leader = dep.holder(), dep.leader()
        assert second and leader
        old_log = e2e_workdir / "ha-old-leader.log"
        with old_log.open("wb") as out:  # streams until the container exits (the pod's log goes with the pod)
            follow = subprocess.Popen([KUBECTL, f"--kubeconfig={cluster.kubeconfig}", "-n", RELEASE_NS, "logs", "-f",
                                       leader], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        before = len(workloads(kctl))
        sigterm = threading.Event()
        posting = Burst(cluster, docs[FIRST:], hold=(2, sigterm))  # the rest once the leader is stopping
        wait_for("the leader at work", lambda: len(workloads(kctl)) >= before + 2, 60, 0.1)
        kctl("-n", RELEASE_NS, "rollout", "restart", f"deployment/{dep.name}")
        wait_for("the leader's pod terminating", lambda: dep.terminating(leader), 240, 0.1)
        termed_at = time.monotonic()
        sigterm.set()
        handover = new_holder(cluster, dep.lease_name, second, termed_at)
        posting.join()
        r = kctl(
            "-n", RELEASE_NS, "rollout", "status", f"deployment/{dep.name}", "--timeout=240s", check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert_exactly_once(kctl, names)
        assert follow.wait(timeout=60) == 0
        assert "released lease" in old_log.read_text(errors="replace")
        assert handover < dep.duration, (
            f"a released Lease is taken within a retry period, not a lease duration: {handover:.1f}s"
        )
        # the killed leader's successor, then the rolling update's (twice when an old standby led in between)
        assert lease(cluster, dep.lease_name)["leaseTransitions"] >= transitions + 2
        print(f"\n[ha] real node: SIGKILL of the leader pod's container with {at_kill[0]}/{FIRST} FineTuneJobs posted and "
              f"{at_kill[1]} workloads created: {'the standby' if took == standby else took} led {takeover:.1f}s later "
              f"(lease {dep.duration:g}s, retry {dep.retry:g}s); all {FIRST} workloads, each once, {all_after:.1f}s after "
              f"the kill\n[ha] real node: rollout restart, the leader's pod terminating -> a new leader {handover:.1f}s "
              f"later; all {FIRST + SECOND} workloads each once", file=sys.stderr)  # fmt: skip
    except BaseException:
        print(f"--- operator pods ---\n{operator.tail(8000)}", file=sys.stderr)
        raise
    finally:
        if follow is not None and follow.poll() is None:
            follow.kill()
            follow.wait()
        dep.scale(1)  # later tests see one operator pod again
        operator.start()
        empty_namespace(kctl, NS)
