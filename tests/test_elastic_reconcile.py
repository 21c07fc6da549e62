"""Elastic resume in the reconcile loop, against the in-memory cluster of tests/test_reconcile_passes.py: a gang
whose pods stay unschedulable past elasticWaitSeconds restarts on the nodes it could place (with a trainer config
for that size), waits when fewer than minNodes could be placed, and grows back at the next restart."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import yaml
from kubetune.api.contract import ExitCode, TerminationMessage
from kubetune.controller import reconcile as rec
from test_reconcile_passes import NOW, STATUS_AND_EVENT, World, created, iso

ELASTIC = {"distributed": {"nodes": 3, "minNodes": 2, "backend": "ddp", "elasticWaitSeconds": 120},
           "training": {"perDeviceBatchSize": 2, "globalBatchSize": 12}}  # fmt: skip


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "now", lambda: NOW)


def unplaced(world: World, count: int, waited: float, job: str = "demo-r0") -> None:
    """The scheduler found no node for the last `count` pods of `job` `waited` seconds ago."""
    pods = sorted(
        (p for p in world.kube.of_kind("Pod") if p["metadata"]["name"].startswith(job)),
        key=lambda p: p["metadata"]["name"],
    )
    for pod in pods[len(pods) - count :]:
        pod["spec"].pop("nodeName", None)
        pod["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "lastTransitionTime": iso(NOW - timedelta(seconds=waited))}]}  # fmt: skip
        world.kube.put(pod)
    world.watch()


def starting(count: int, waited: float) -> World:
    world = created(**ELASTIC)
    world.pods("Running")
    unplaced(world, count, waited)
    world.kube.forget_calls()
    return world


def config(world: World) -> dict[str, Any]:
    cm = world.kube.get("ConfigMap", "ml", "demo-config")
    assert cm is not None
    return dict(yaml.safe_load(next(iter(cm["data"].values()))))


def test_a_whole_elastic_gang_reports_its_size() -> None:
    world = created(**ELASTIC)
    assert (world.status["gangNodes"], world.status["worldSize"]) == (3, 3)
    assert (config(world)["worldSize"], config(world)["gradientAccumulationSteps"]) == (3, 2)


def test_before_the_wait_the_gang_waits_and_the_loop_wakes_when_it_ends() -> None:
    world = starting(1, waited=115)
    wake = world.reconcile()
    assert wake == pytest.approx(5.5)  # 120 s - 115 s, plus half a second
    assert ("delete", "Job", "demo-r0") not in world.kube.writes()
    assert world.status["gangNodes"] == 3


def test_past_the_wait_the_gang_restarts_on_the_nodes_it_placed_with_the_same_global_batch() -> None:
    world = starting(1, waited=121)
    pods = sorted(p["metadata"]["name"] for p in world.kube.of_kind("Pod"))
    world.reconcile()
    # the gang never formed (a pod found no node): its pods, waiting in the rendezvous, are stopped at once (1 s
    # grace, nothing to checkpoint), then the Job (a Job's size is fixed) is deleted
    stops = [("delete", "Pod", n) for n in pods]
    assert world.kube.writes() == [*STATUS_AND_EVENT, *stops, ("delete", "Job", "demo-r0")]
    assert {str(c.body) for c in world.kube.requests if c.verb == "delete" and c.kind == "Pod"} == {
        "{'gracePeriodSeconds': 1}"
    }
    assert world.status["phase"] == "Restarting" and (
        world.status["gangNodes"],
        world.status["worldSize"],
    ) == (2, 2)
    assert [e[:2] for e in world.kube.events()][-1] == ("Warning", "GangShrinking")
    assert "1 of 3 pods unschedulable for 120s" in world.status["message"], world.status["message"]

    world.collect_garbage()
    world.kube.forget_calls()
    world.reconcile()
    job = world.job(
        "demo-r0"
    )  # a new Job of the gang's size (a Job's pod template and completions are fixed)
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 2
    assert (
        "--nnodes" in (args := job["spec"]["template"]["spec"]["containers"][0]["args"])
        and args[args.index("--nnodes") + 1] == "2"
    )
    assert (config(world)["worldSize"], config(world)["gradientAccumulationSteps"]) == (
        2,
        3,
    )  # 2 x 2 x 3 = 12
    assert config(world)["spec"]["distributed"]["nodes"] == 3  # the job's own spec: what checkpoints record

    # a later failure restarts the whole gang: it grows back when the nodes have returned
    world.pods("Running")
    world.reconcile()
    for name in [p["metadata"]["name"] for p in world.kube.of_kind("Pod")]:
        del world.kube.objects[("Pod", "ml", name)]
    world.pods("Failed", TerminationMessage.build(ExitCode.INFRASTRUCTURE, "NCCL timeout"))
    world.reconcile()
    assert (world.status["phase"], world.status["gangNodes"], world.status["worldSize"]) == (
        "Restarting",
        3,
        3,
    )
    assert ("delete", "Job", "demo-r0") in world.kube.writes()  # the 2-node Job cannot run 3 nodes
    world.collect_garbage()
    world.reconcile()
    assert world.job("demo-r0")["spec"]["parallelism"] == 3
    assert config(world)["worldSize"] == 3


def test_with_fewer_than_min_nodes_placed_the_gang_keeps_waiting() -> None:
    world = starting(2, waited=600)
    world.reconcile()
    assert ("delete", "Job", "demo-r0") not in world.kube.writes()
    assert world.status["gangNodes"] == 3


def test_a_fixed_size_gang_never_shrinks_and_has_no_size_in_its_status() -> None:
    world = created(distributed={"nodes": 3, "backend": "ddp"})
    world.pods("Running")
    unplaced(world, 1, waited=3600)
    world.reconcile()
    assert ("delete", "Job", "demo-r0") not in world.kube.writes()
    assert "gangNodes" not in world.status
