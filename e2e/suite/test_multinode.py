"""Many nodes for real (issue 24): the session's cluster with two more real nodes (kubelet + containerd
each in a network namespace of its own, its own pod CIDR, routed to the others; `multinode_cluster` in
e2e/conftest.py). A 2 nodes x 1 process LoRA job places one pod per node (the operator's topology
spread), rendezvouses across the nodes through the headless Service and CoreDNS, and succeeds; a 3-node
ZeRO-2 full fine-tune with minNodes 2 loses a node mid-run and finishes at world size 2 on the nodes that
are left; then a node is powered off under a 2-node gang, which comes back from its newest checkpoint on
the node that is left.

Real node only. The tests run in this order: each power-off leaves its node dead (the fixture removes
them), so the elastic test takes the third node and the node-loss test the second."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import pytest
import yaml
from conftest import checkpoints, job_doc, wait_for
from harness.mode import NODE_MODE
from sampler import Sampler

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(NODE_MODE != "kubelet", reason="needs the real node (KUBETUNE_E2E_NODE=kubelet)"),
]
NS_KEY = "faults"
NODES = 3  # the session's node + two extra: a gang of 3 across nodes that loses one and goes on with 2


def gang(kctl: Any, ns: str, name: str, restart: int) -> dict[str, dict[str, Any]]:
    """rank -> pod of one gang generation."""
    sel = f"-l=kubetune.io/job-name={name},kubetune.io/restart={restart}"
    return {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in kctl.get(ns, "pods", None, sel) or []
    }


def _step(sample: dict[str, Any]) -> Any:
    """The step a status sample shows, or None (no progress yet, or progress before the first step)."""
    return (sample.get("progress") or {}).get("step")


def logs(cluster: Any, ns: str, pod: str) -> str:
    return str(cluster.kubectl("-n", ns, "logs", pod, check=False).stdout)


def test_nodes_ready_each_with_its_own_address_and_pod_cidr(operator, multinode_cluster):
    """(`operator` first: the session's operator pod starts on node 1 before the extra node exists, so the
    power-off below never takes the operator with it.)"""
    mn = multinode_cluster
    assert all(mn.ready().values()), mn.ready()
    ips = {n.name: n.ip for n in mn.nodes}
    cidrs = {n.name: n.pod_cidr for n in mn.nodes}
    assert len(set(ips.values())) == len(mn.nodes) and len(set(cidrs.values())) == len(mn.nodes), (ips, cidrs)
    for n in mn.nodes:
        got = mn.cluster.admin.get(f"/api/v1/nodes/{n.name}")
        addrs = {a["type"]: a["address"] for a in got["status"]["addresses"]}
        assert addrs["InternalIP"] == n.ip, addrs
        assert got["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    print(
        f"\n[multinode] {mn.names}: ips {ips} pod CIDRs {cidrs}, added in {mn.started_s:.1f}s",
        file=sys.stderr,
    )


def test_lora_job_one_pod_per_node_rendezvous_across_nodes(
    multinode_cluster, cluster, kctl, suite_ns, s3, s3_data, operator
):
    name = "mn-lora"
    t0 = time.monotonic()
    kctl.apply(suite_ns, job_doc(name, s3, s3_data, steps=8, checkpoint_steps=8))
    wait_for("Succeeded or Failed", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 300, 1)
    took = time.monotonic() - t0
    status = kctl.status(suite_ns, name)
    pods = gang(kctl, suite_ns, name, 0)
    text = {r: logs(cluster, suite_ns, p["metadata"]["name"]) for r, p in pods.items()}
    placed = {r: p["spec"]["nodeName"] for r, p in pods.items()}
    print(f"\n[multinode] {name}: {took:.1f}s, placed {placed}", file=sys.stderr)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n" + json.dumps(text)[-4000:]
    # One pod per node (the operator's topology spread over kubernetes.io/hostname), on two of the nodes.
    assert len(set(placed.values())) == 2 and set(placed.values()) <= set(multinode_cluster.names), placed
    # Rank 1 found rank 0 by its DNS name through CoreDNS (the headless Service), from another node, and
    # the two trained together: rank 0 saw world size 2, and DDP's all-reduce of every step's gradients
    # needs both ranks, so 8 steps done at world size 2 are 8 steps of each rank.
    assert "world size 2" in text["0"], text["0"][-2000:]
    assert re.search(r"step 8/8 loss \d", text["0"]), text["0"][-2000:]
    assert status["progress"]["step"] == 8, status
    assert text["1"].strip(), "rank 1 left no log"
    assert status.get("restarts", 0) == 0, status


def checkpoint_ranks(s3: Any, name: str, step: int) -> set[int]:
    """The ranks whose ZeRO optimizer-state partition the checkpoint of `step` holds (each node uploads its own)."""
    pages = s3.client().get_paginator("list_objects_v2")
    keys = [o["Key"] for page in pages.paginate(Bucket=s3.bucket, Prefix=f"runs/{name}/checkpoints/step-{step:08d}/")
            for o in page.get("Contents") or []]  # fmt: skip
    found = (re.search(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states", k) for k in keys)
    return {int(m.group(1)) for m in found if m}


def trained_state(s3: Any, name: str, step: int) -> dict[str, Any]:
    key = f"runs/{name}/checkpoints/step-{step:08d}/trainer_state.json"
    return dict(json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()))


def trainer_config(kctl: Any, ns: str, name: str) -> dict[str, Any]:
    cm = kctl.get(ns, "configmap", f"{name}-config")
    return dict(yaml.safe_load(next(iter(cm["data"].values()))))


def test_zero2_gang_of_three_loses_a_node_and_finishes_at_world_size_two(
    multinode_cluster, cluster, kctl, suite_ns, s3, s3_data, operator
):
    """A full fine-tune with DeepSpeed ZeRO-2 over gloo (the GPU is the only fake: gpusPerNode 1 on nodes that
    advertise nvidia.com/gpu, and the trainer runs ZeRO on the CPU), 3 nodes x 1 process, minNodes 2. Each pod
    requests more than half a node's memory, as a rank that fills its machine does: one pod per node, and a
    third pod has nowhere to go once a node is gone. The gang trains at world size 3 across the three nodes; one
    extra node is powered off after the first checkpoint; the operator restarts the gang (NodeLost), its third
    pod stays unschedulable for elasticWaitSeconds, and the gang restarts at 2 nodes (GangShrinking) from the
    newest checkpoint, with accumulation 3 instead of 2 for the same global batch of 12, and succeeds."""
    mn = multinode_cluster
    name = "mn-elastic"
    steps, every = 48, 6  # ~0.15 s a step on an idle machine: the power-off must land mid-run
    allocatable = min(
        int(mn.cluster.admin.get(f"/api/v1/nodes/{n}")["status"]["allocatable"]["memory"].removesuffix("Ki"))
        for n, ok in mn.ready().items() if ok
    )  # fmt: skip
    doc = job_doc(name, s3, s3_data, example="full", steps=steps, checkpoint_steps=every,
                  **{"distributed.nodes": 3, "distributed.minNodes": 2, "distributed.elasticWaitSeconds": 30,
                     "distributed.backend": "deepspeed", "distributed.zeroStage": 2, "distributed.gpusPerNode": 1,
                     "distributed.nodeLossTolerationSeconds": 30, "terminationGracePeriodSeconds": 30,
                     "training.perDeviceBatchSize": 2, "training.globalBatchSize": 12,
                     "resources.requests.memory": f"{allocatable * 11 // 20}Ki",
                     "output.keepCheckpoints": 10, "runPolicy.backoffLimit": 3, "freeze": None})  # fmt: skip
    t0 = time.monotonic()
    kctl.apply(suite_ns, doc)
    lost = None
    try:
        with Sampler(cluster, suite_ns, name) as sampler:
            wait_for("first checkpoint in S3", lambda: checkpoints(s3, name), 300, 0.5)
            before = gang(kctl, suite_ns, name, 0)
            placed = {r: p["spec"]["nodeName"] for r, p in before.items()}
            assert sorted(placed.values()) == sorted(mn.names), placed  # one pod per node, on all three
            first_text = logs(cluster, suite_ns, before["0"]["metadata"]["name"])  # before its node may go
            assert f"step {steps}/{steps}" not in first_text, "finished before the power-off"
            # an extra node: never node 1, which holds the operator, the scheduler and CoreDNS
            lost = mn.nodes[-1]
            rank = next(r for r, n in placed.items() if n == lost.name)
            t_off = time.monotonic()
            lost.power_off()
            newest_at_cut = checkpoints(s3, name)[-1]
            first_config = trainer_config(kctl, suite_ns, name)  # the shrink rewrites it minutes later
            done = ("Succeeded", "Failed")
            wait_for("Succeeded or Failed", lambda: kctl.phase(suite_ns, name) in done, 600, 1)
            time.sleep(0.5)
    finally:
        # what an admin does for a dead node's pods: their kubelet will never finish them
        if lost is not None:
            for p in kctl.get(suite_ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []:
                if p["spec"].get("nodeName") == lost.name:
                    kctl("-n", suite_ns, "delete", "pod", p["metadata"]["name"], "--force", "--grace-period=0",
                         check=False)  # fmt: skip
    took = time.monotonic() - t0
    status = kctl.status(suite_ns, name)
    # The first gang: one pod per node on all three, rendezvoused across them, world size 3, and every rank
    # stepped: rank 0 logged steps at world size 3, and the first checkpoint holds an optimizer-state partition
    # from each of the three ranks (ZeRO-2 shards Adam's state; each node uploads its own rank's part).
    assert "world size 3" in first_text, first_text[-3000:]
    assert re.search(rf"step \d+/{steps} loss \d", first_text), first_text[-3000:]
    first = checkpoints(s3, name)[0]
    assert checkpoint_ranks(s3, name, first) == {0, 1, 2}, first
    assert trained_state(s3, name, first)["world_size"] == 3
    assert (first_config["worldSize"], first_config["gradientAccumulationSteps"]) == (3, 2), first_config
    # The node loss, then the shrink: NodeLost restarted the whole gang, whose third pod found no node; after
    # elasticWaitSeconds the operator restarted it at 2 nodes.
    restarting = [s.get("message", "") for _, s in sampler.samples if s.get("phase") == "Restarting"]
    shrink = "unschedulable for 30s; restarting the gang from the last checkpoint on 2 nodes"  # GangShrinking
    shrunk_at = next((t for t, s in sampler.samples if s.get("gangNodes") == 2), None)
    resumed = next((t for t, s in sampler.samples if s.get("worldSize") == 2 and s.get("phase") == "Running"
                    and (_step(s) or 0) > newest_at_cut), None)  # fmt: skip
    timing = f"shrink restart after {shrunk_at - t_off:.0f}s" if shrunk_at else "no shrink seen"
    timing += f", steps at world size 2 after {resumed - t_off:.0f}s" if resumed else ""
    print(f"\n[multinode] {name}: {took:.0f}s in all; power-off of {lost.name} at checkpoint {newest_at_cut}; "
          f"{timing}; phases={sampler.phases}", file=sys.stderr)  # fmt: skip
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    lf = status["lastFailure"]
    assert lf["reason"] == "NodeLost" and lost.name in lf["message"], lf
    assert lf["pod"] == before[rank]["metadata"]["name"], lf
    events = kctl.get(suite_ns, "events", None, "--field-selector=reason=NodeLost") or []
    assert any(lost.name in e["message"] and e["involvedObject"]["name"] == name for e in events), events
    assert any(shrink in m for m in restarting), restarting
    assert status["restarts"] == 2 and status["gangNodes"] == 2 and status["worldSize"] == 2, status
    # The gang that finished: 2 pods on the 2 nodes left, world size 2, the same global batch (2 x 2 x 3 = 12),
    # resumed from the newest complete checkpoint at the power-off (written at world size 3) and trained to the end.
    last = gang(kctl, suite_ns, name, 2)
    assert sorted(p["spec"]["nodeName"] for p in last.values()) == sorted(set(mn.names) - {lost.name}), last
    text = logs(cluster, suite_ns, last["0"]["metadata"]["name"])
    config = trainer_config(kctl, suite_ns, name)
    assert (config["worldSize"], config["gradientAccumulationSteps"]) == (2, 3), config
    assert "world size 2" in text, text[-3000:]
    m = re.search(r"resumed from checkpoint step (\d+)", text)
    assert m and int(m.group(1)) >= newest_at_cut, (newest_at_cut, text[-3000:])
    assert trained_state(s3, name, int(m.group(1)))["world_size"] == 3
    assert f"step {steps}/{steps} loss" in text, text[-3000:]
    assert checkpoint_ranks(s3, name, steps) == {0, 1}
    assert trained_state(s3, name, steps)["world_size"] == 2
    assert status["progress"]["step"] == steps and len(kctl.get(suite_ns, "jobs")) == 1, status


def test_node_power_off_mid_run_gang_resumes_on_the_node_left(
    multinode_cluster, cluster, kctl, suite_ns, s3, s3_data, operator
):
    """The extra node loses power mid-run (link down, then SIGKILL to its kubelet, containerd, shims and
    containers: no drain, no FIN). The node lifecycle controller marks it unreachable (20 s grace in the
    harness), the rank pod there is evicted once its toleration (nodeLossTolerationSeconds: 30, the floor)
    runs out, the operator names the node (lastFailure, an Event NodeLost) and restarts the gang from the
    newest complete checkpoint on the node that is left."""
    mn = multinode_cluster
    name = "mn-node-loss"
    steps = 100  # on an idle machine 10 steps take ~2 s: the power-off must land mid-run
    doc = job_doc(name, s3, s3_data, steps=steps, checkpoint_steps=10,
                  **{"runPolicy.backoffLimit": 2, "distributed.nodeLossTolerationSeconds": 30,
                     "terminationGracePeriodSeconds": 30})  # fmt: skip
    kctl.apply(suite_ns, doc)
    lost = None
    try:
        with Sampler(cluster, suite_ns, name) as sampler:
            wait_for("first checkpoint in S3", lambda: checkpoints(s3, name), 240, 0.5)
            before = gang(kctl, suite_ns, name, 0)
            placed = {r: p["spec"]["nodeName"] for r, p in before.items()}
            assert len(set(placed.values())) == 2, placed
            lost = next(n for n in mn.nodes[1:] if n.name in placed.values())
            left = {n for n, ok in mn.ready().items() if ok and n != lost.name}
            ckpt = checkpoints(s3, name)[-1]
            # still training (the phase may still read Initializing: only a finished run would spoil the test)
            assert kctl.phase(suite_ns, name) not in ("Succeeded", "Failed"), "finished before the power-off"
            t_off = time.monotonic()
            lost.power_off()
            newest_at_cut = checkpoints(s3, name)[-1]
            n_before = len(sampler.samples)
            wait_for("NotReady", lambda: not mn.ready()[lost.name], 120, 1)
            t_notready = time.monotonic()
            wait_for(
                "Succeeded or Failed", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 420, 1
            )
            time.sleep(0.5)
    finally:
        if (
            lost is not None
        ):  # what an admin does for a dead node's pods: their kubelet will never finish them
            for p in kctl.get(suite_ns, "pods", None, f"-l=kubetune.io/job-name={name}") or []:
                if p["spec"].get("nodeName") == lost.name:
                    kctl("-n", suite_ns, "delete", "pod", p["metadata"]["name"], "--force", "--grace-period=0",
                         check=False)  # fmt: skip
    status = kctl.status(suite_ns, name)
    after = sampler.samples[n_before:]
    restarted = next(t for t, s in after if s.get("restarts", 0) >= 1)
    # the old gang's last step stays shown until the new rank 0 reports: the first other step is the new gang's
    last_old = next(
        (int(step) for _, s in reversed(sampler.samples[:n_before]) if (step := _step(s)) is not None), -1
    )
    resumed = next(
        t for t, s in after
        if s.get("restarts", 0) >= 1 and _step(s) not in (None, last_old)
    )  # fmt: skip
    timing = (f"node Unknown after {t_notready - t_off:.0f}s, gang restart after {restarted - t_off:.0f}s, "
              f"steps resumed after {resumed - t_off:.0f}s")  # fmt: skip
    print(
        f"\n[multinode] {name}: power-off at checkpoint {ckpt}; {timing}; phases={sampler.phases}",
        file=sys.stderr,
    )
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["restarts"] == 1, status
    # The status and an Event name the lost node.
    lf = status["lastFailure"]
    assert lf["reason"] == "NodeLost" and lost.name in lf["message"], lf
    assert lf["pod"] == before[next(r for r, n in placed.items() if n == lost.name)]["metadata"]["name"], lf
    events = json.loads(
        kctl("-n", suite_ns, "get", "events", "--field-selector", "reason=NodeLost", "-o", "json").stdout
    )
    assert any(lost.name in e["message"] and e["involvedObject"]["name"] == name for e in events["items"]), (
        events
    )
    # The new gang runs on the nodes that are left, resumed from the newest complete checkpoint at the power-off.
    again = gang(kctl, suite_ns, name, 1)
    assert {p["spec"]["nodeName"] for p in again.values()} <= left, (left, again)
    m = re.search(
        r"resumed from checkpoint step (\d+)", logs(cluster, suite_ns, again["0"]["metadata"]["name"])
    )
    assert m, "the new rank 0 did not resume from a checkpoint"
    assert int(m.group(1)) >= newest_at_cut, (m.group(1), newest_at_cut)
    # Nothing duplicated: one Job, the new gang's; the step shown never went back past that checkpoint.
    jobs = kctl.get(suite_ns, "jobs")  # one Job: restarted in place (-r0) or anew
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    shown = [int(step) for t, s in after if t >= resumed and (step := _step(s)) is not None]
    assert shown and min(shown) >= newest_at_cut, (newest_at_cut, shown)
    assert status["progress"]["step"] == steps
