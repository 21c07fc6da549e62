"""Two operator replicas with leader election (`kubetune operator --leader-elect`, the chart's Lease and RBAC,
the chart ServiceAccount's token), against the real API server:

1. the leader is killed with SIGKILL in the middle of a burst of FineTuneJobs (suspended: no pods): the
   standby takes the Lease once it has stood still for its duration and finishes the burst;
2. a rolling update: a third replica starts, the leader gets SIGTERM mid-burst, releases the Lease, and
   the new standby leads within a retry period.

Every FineTuneJob ends with exactly one workload Job (listed by the owner label): none lost, none twice.
Prints both takeover times."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest
from conftest import HA_NAMESPACE, LEADER_ELECTION, RELEASE_NS, Operator, empty_namespace, job_doc, wait_for
from harness.procs import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not LEADER_ELECTION, reason="the real node runs the chart's one operator pod; "
                                 "replicas run as local processes with the node agent")]  # fmt: skip
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
    """POSTs the FineTuneJobs one by one, `gap` seconds apart; `.posted` counts them."""

    def __init__(self, cluster: Any, docs: list[dict[str, Any]], gap: float = 0.15) -> None:
        super().__init__(daemon=True)
        self.cluster, self.docs, self.gap, self.posted = cluster, docs, gap, 0
        self.start()

    def run(self) -> None:
        for doc in self.docs:
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
        assert job["metadata"]["name"] == f"{name}-r0" and job["metadata"]["ownerReferences"][0]["uid"] == uids[name]
    wait_for("every job Suspended", lambda: all((f.get("status") or {}).get("phase") == "Suspended"
                                                for f in kctl.get(NS, "ftj")), 120, 1)  # fmt: skip


def test_killing_the_leader_mid_burst_loses_no_workload(cluster, kctl, installed, s3, s3_data, e2e_workdir):
    docs = [job_doc(f"ha-{i:02d}", s3, s3_data, steps=5, **{"runPolicy.suspend": True}) for i in range(FIRST + SECOND)]
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
        assert takeover <= LEASE + 4 * RETRY + 10, takeover  # the lease duration, a retry, the API server's latency

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
        assert handover < LEASE, f"a released Lease is taken within a retry period, not a lease duration: {handover:.1f}s"
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
