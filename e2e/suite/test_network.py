"""The network check on the real node: a rank whose route to rank 0 is gone fails the job with NetworkUnreachable
in seconds, naming both pods and the port, instead of hanging on torchrun's rendezvous for 15 minutes.

The harness's nodes use the plain `bridge` CNI plugin, which does not enforce NetworkPolicy, so the path is
blocked the way a broken route blocks it: an `unreachable` route to rank 0's pod IP inside rank 1's pod network
namespace (inside the harness's own namespace; nothing of the host changes). The node agent's pods share one
network namespace, so there the test is skipped.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from conftest import job_doc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "faults"


def pod_ips(kctl: Any, ns: str, name: str) -> dict[str, tuple[str, str]] | None:
    """completion index -> (pod name, pod IP), once both pods have an IP."""
    pods = kctl.get(ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []
    found = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: (
            p["metadata"]["name"],
            p["status"].get("podIP"),
        )
        for p in pods
    }
    return found if len(found) == 2 and all(ip for _, ip in found.values()) else None


def netns_of(node: Any, ip: str) -> str:
    """The network namespace (under the harness's /run/netns) that holds `ip`."""
    for netns in node.ns.run(["ls", "/run/netns"]).stdout.split():
        if f" {ip}/" in node.ns.run(["ip", "-n", netns, "-o", "-4", "addr", "show"]).stdout:
            return str(netns)
    raise AssertionError(f"no network namespace holds {ip}")


def test_a_rank_without_a_route_to_rank_zero_fails_the_job_with_network_unreachable(
    kctl, suite_ns, s3, s3_data, node, operator
):
    if getattr(node, "ns", None) is None:
        pytest.skip("the node agent's pods share one network namespace: there is no route of a pod to block")
    name = "net-blocked"
    doc = job_doc(name, s3, s3_data, steps=5, **{"distributed.networkCheck.timeoutSeconds": 5})
    kctl.apply(suite_ns, doc)
    try:
        blocked_rank_fails_the_job(kctl, suite_ns, node, name)
    finally:
        # Rank 0's torchrun, the container's PID 1, still waits in the rendezvous and has no SIGTERM handler before
        # its workers start (PID 1 ignores such a signal): its pod would stay Terminating for its grace period.
        selector = f"-l=kubetune.io/job-name={name}"
        kctl("-n", suite_ns, "delete", "pods", selector, "--grace-period=0", "--force", check=False)


def blocked_rank_fails_the_job(kctl: Any, suite_ns: str, node: Any, name: str) -> None:
    ips = wait_for("both pods with an IP", lambda: pod_ips(kctl, suite_ns, name), 300, 0.2)
    (rank0_pod, rank0_ip), (rank1_pod, rank1_ip) = ips["0"], ips["1"]
    # Before rank 0's torchrun listens (it is still importing torch), rank 1's probe sees refusals and waits.
    node.ns.run(["ip", "-n", netns_of(node, rank1_ip), "route", "add", "unreachable", f"{rank0_ip}/32"])
    blocked_at = time.monotonic()
    wait_for("Failed", lambda: kctl.phase(suite_ns, name) == "Failed", 120, 0.5)
    took = time.monotonic() - blocked_at
    status = kctl.status(suite_ns, name)
    print(f"\n[suite] {name}: Failed {took:.1f} s after the route was blocked: {status.get('lastFailure')}",
          file=sys.stderr)  # fmt: skip
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NetworkUnreachable", failed
    last = status["lastFailure"]
    assert (last["pod"], last["exitCode"], last["reason"]) == (rank1_pod, 72, "NetworkUnreachable"), last
    for needle in (
        f"pod {rank1_pod} (node rank 1)",
        f"rank 0's pod {name}-r0-0",
        "port 29500",
        "No route to host",
    ):
        assert needle in last["message"], last["message"]
    assert rank0_pod.startswith(f"{name}-r0-0")
    assert status["restarts"] == 0  # no restart: the network must change first
    assert took < 60, took  # seconds (the 5 s bound, the pod's exit, the operator's pass), not 15 minutes
