"""A gang scheduler: kubernetes-sigs/scheduler-plugins' Coscheduling, as a second scheduler beside the node's
kube-scheduler, the way scheduler-plugins' "as a second scheduler" install runs it.

    with Coscheduling(cluster, workdir / "coscheduling") as gang:
        ...   # pods with schedulerName scheduler-plugins-scheduler and the scheduling.x-k8s.io/pod-group label

The binary is kube-scheduler v1.32 with only the Coscheduling plugin registered, built by build.sh
(`coscheduling`) from sigs.k8s.io/scheduler-plugins v0.32.7; the PodGroup CRD is the release's own
(config/crd/bases). It runs inside the node's namespace (or on the host with the node agent, which binds only
pods of the default scheduler) under the identity system:kube-scheduler plus a ClusterRole for PodGroups (what
the release's RBAC grants its scheduler). Only the scheduler runs: scheduler-plugins' PodGroup controller (which
writes PodGroup status phases) is not needed for the gang decision, which is the plugin's (PreFilter/Permit).

It is what wakes a waiting gang, though. A pod the plugin turns away (PreFilter: the PodGroup's minResources do
not fit) goes back to the scheduling queue only on the events the plugin registers (a pod added, a PodGroup added
or updated; the controller updates the running gang's PodGroup when its pods finish), or when the scheduler's
leftover flush (every 30 s) finds it unschedulable for longer than --pod-max-in-unschedulable-pods-duration
(default 5 min). Without the controller, a gang waiting for another to finish was bound 5 min 26 s after the
pods were rejected (test_gang_scheduler, one run). The harness sets that duration to `retry_unschedulable_s`
(10 s): a waiting gang is tried again at each flush, so within 30 s of room appearing, and more often while it
must still be refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from . import binaries
from .kueue import wait_established
from .procs import Proc, StartStop, free_port

SCHEDULER_NAME = "scheduler-plugins-scheduler"
CRD = "podgroups.scheduling.x-k8s.io"
ROLE = "kubetune-e2e-coscheduling"


class Coscheduling(StartStop):
    def __init__(
        self, cluster: Any, workdir: Path, permit_waiting_seconds: int = 10, retry_unschedulable_s: int = 10
    ) -> None:
        self.cluster = cluster
        self.dir = workdir
        self.permit_waiting_seconds = permit_waiting_seconds
        self.retry_unschedulable_s = retry_unschedulable_s
        self.proc: Proc | None = None

    @property
    def log(self) -> Path:
        return self.dir / "coscheduling.log"

    def start(self) -> None:
        binary = binaries.ensure("coscheduling")["coscheduling"]
        crds = binaries.crds("coscheduling")
        c, d = self.cluster, self.dir
        d.mkdir(parents=True, exist_ok=True)
        c.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(crds / "scheduling.x-k8s.io_podgroups.yaml"),
        )
        wait_established(c, CRD)
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": ROLE},
                "rules": [{"apiGroups": ["scheduling.x-k8s.io"], "resources": ["podgroups", "elasticquotas"],
                           "verbs": ["get", "list", "watch", "update", "patch"]},
                          {"apiGroups": ["scheduling.x-k8s.io"], "resources": ["podgroups/status"],
                           "verbs": ["get", "update", "patch"]}]}  # fmt: skip
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": ROLE},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE},
                   "subjects": [{"kind": "User", "name": "system:kube-scheduler", "apiGroup": "rbac.authorization.k8s.io"}]}  # fmt: skip
        c.apply(yaml.safe_dump_all([role, binding]))
        crt, key = c.ca.issue("coscheduling", "system:kube-scheduler")
        kubeconfig = c.write_kubeconfig(d / "coscheduling.kubeconfig", "coscheduling", crt, key)
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
            "leaderElection": {"leaderElect": False}, "clientConnection": {"kubeconfig": str(kubeconfig)},
            "profiles": [{
                "schedulerName": SCHEDULER_NAME,
                "plugins": {"multiPoint": {"enabled": [{"name": "Coscheduling"}]},
                            "queueSort": {"enabled": [{"name": "Coscheduling"}], "disabled": [{"name": "*"}]}},
                "pluginConfig": [{"name": "Coscheduling", "args": {"permitWaitingTimeSeconds": self.permit_waiting_seconds}}],
            }],
        }  # fmt: skip
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        argv = [str(binary), f"--config={d / 'config.yaml'}", f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                f"--pod-max-in-unschedulable-pods-duration={self.retry_unschedulable_s}s", "--v=2"]  # fmt: skip
        ns = getattr(c, "ns", None)
        self.proc = Proc("coscheduling", ns.argv(argv) if ns is not None else argv, self.log)
        deadline = time.monotonic() + 60
        while "Starting Kubernetes Scheduler" not in self.proc.tail(
            200
        ) and "Attempting to acquire" not in self.proc.tail(200):
            self.proc.check()
            if time.monotonic() > deadline:
                raise TimeoutError("the coscheduling scheduler did not start:\n" + self.proc.tail())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
