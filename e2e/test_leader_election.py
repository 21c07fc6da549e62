"""Leader election (kubetune.controller.leader) against a real kube-apiserver's coordination.k8s.io Leases:
two candidates racing for a new Lease, a live leader keeping it, a dead leader's Lease taken after its
duration (and the old leader finding out), and a released Lease taken at once. Short timings (3 s lease) to
stay lean; the operator processes themselves are in suite/test_ha.py."""

from __future__ import annotations

import threading
import time
from typing import Any

from kubernetes import client
from kubetune.controller.leader import Elector, Outcome

LEASE, RENEW, RETRY = 3.0, 2.0, 0.5


def electors(cluster: Any, namespace: str, name: str, *ids: str) -> list[Elector]:
    api = client.CoordinationV1Api(cluster.api_client())
    return [
        Elector(namespace, name, i, lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY, api=api)
        for i in ids
    ]


def lease(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    return cluster.admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")["spec"]


def race(cands: list[Elector]) -> dict[str, Outcome]:
    """Each candidate's first attempt, all started at the same moment."""
    start = threading.Barrier(len(cands))
    outcomes: dict[str, Outcome] = {}

    def run(e: Elector) -> None:
        start.wait()
        outcomes[e.identity] = e.try_acquire_or_renew()

    threads = [threading.Thread(target=run, args=(e,)) for e in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_of_two_candidates_racing_for_a_new_lease_exactly_one_leads(cluster, namespace):
    for round_ in range(3):
        name = f"race-{round_}"
        outcomes = race(electors(cluster, namespace, name, "a", "b"))
        leaders = [i for i, o in outcomes.items() if o is Outcome.LEADING]
        assert len(leaders) == 1, outcomes
        assert lease(cluster, namespace, name)["holderIdentity"] == leaders[0]


def test_a_dead_leaders_lease_is_taken_after_its_duration_and_a_released_one_at_once(cluster, namespace):
    a, b, c = electors(cluster, namespace, "handover", "a", "b", "c")
    assert a.try_acquire_or_renew() is Outcome.LEADING
    lost: list[str] = []
    a.keep(lost.append)

    # While a renews, b never gets it, though it tries for longer than the lease duration.
    until = time.monotonic() + LEASE + 1
    while time.monotonic() < until:
        assert b.try_acquire_or_renew() is Outcome.HELD
        time.sleep(RETRY)
    assert lost == []

    # a stops renewing without releasing (as if killed): b takes over once the Lease stood still for LEASE.
    a._stop.set()
    waited = b.acquire()
    assert LEASE - 2 * RETRY <= waited <= LEASE + 3 * RETRY + 2, waited
    spec = lease(cluster, namespace, "handover")
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert a.renew_once() == "the lease is held by b"  # the old leader finds out at its next renewal

    # b releases it (a graceful stop): c, standing by, takes it at its next attempt.
    b.keep(lost.append)
    assert c.try_acquire_or_renew() is Outcome.HELD
    b.release()
    assert "holderIdentity" not in lease(cluster, namespace, "handover")  # released: no holder
    assert c.acquire() < 2 * RETRY
    spec = lease(cluster, namespace, "handover")
    assert spec["holderIdentity"] == "c" and spec["leaseTransitions"] == 2
    assert lost == []
