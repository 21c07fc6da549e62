"""status.usage arithmetic: wall time, node-seconds and GPU-seconds per run and in total, and the estimated cost."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubetune.api.models import FineTuneJobSpec, Usage
from kubetune.status.usage import PriceTable, accrue
from operator_samples import spec

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


def pods(n: int, phase: str = "Running") -> list[dict]:
    return [{"metadata": {"name": f"p-{i}"}, "status": {"phase": phase}} for i in range(n)]


def gpu_spec(nodes: int = 2, gpus: int = 4, **extra) -> FineTuneJobSpec:
    return spec(distributed={"nodes": nodes, "gpusPerNode": gpus}, **extra)


def test_running_pods_are_charged_for_the_interval_since_the_last_look():
    s = gpu_spec()
    first = accrue(None, "Initializing", "Running", pods(2), s, 1, T0)
    assert (first.wall_seconds, first.node_seconds, first.running_pods) == (
        0.0,
        0.0,
        2,
    )  # nothing before the first look
    second = accrue(first, "Running", "Running", pods(2), s, 1, T0 + timedelta(seconds=60))
    assert (second.wall_seconds, second.node_seconds, second.gpu_seconds) == (60.0, 120.0, 480.0)
    assert second.runs[0].run == 1 and second.runs[0].gpu_seconds == 480.0


def test_suspended_time_is_not_charged():
    s = gpu_spec()
    running = accrue(
        accrue(None, "Running", "Running", pods(2), s, 1, T0),
        "Running",
        "Suspended",
        [],
        s,
        1,
        T0 + timedelta(seconds=10),
    )
    assert running.running_pods == 0 and running.gpu_seconds == 80.0
    suspended = accrue(running, "Suspended", "Suspended", [], s, 1, T0 + timedelta(hours=5))
    assert (suspended.wall_seconds, suspended.gpu_seconds) == (10.0, 80.0)


def test_a_restart_is_charged_wall_time_and_the_pods_that_still_ran():
    s = gpu_spec(nodes=2, gpus=1)
    u = accrue(None, "Running", "Restarting", pods(1), s, 1, T0)  # one rank failed, one still running
    u = accrue(u, "Restarting", "Initializing", pods(2, "Pending"), s, 1, T0 + timedelta(seconds=20))
    assert (u.wall_seconds, u.node_seconds, u.running_pods) == (20.0, 20.0, 0)
    u = accrue(u, "Initializing", "Running", pods(2), s, 1, T0 + timedelta(seconds=50))
    u = accrue(u, "Running", "Succeeded", pods(2, "Succeeded"), s, 1, T0 + timedelta(seconds=110))
    assert (u.wall_seconds, u.node_seconds, u.gpu_seconds, u.running_pods) == (110.0, 140.0, 140.0, 0)


def test_each_run_has_its_own_figures_and_the_total_adds_them_up():
    s = gpu_spec(nodes=1, gpus=2)
    u = accrue(
        accrue(None, "Running", "Running", pods(1), s, 1, T0),
        "Running",
        "Succeeded",
        [],
        s,
        1,
        T0 + timedelta(seconds=100),
    )
    u = u.model_copy(
        update={"updated_at": "2026-12-01T13:00:00Z"}
    )  # a new run starts an hour later (kubetune.status.runs)
    u = accrue(u, "Pending", "Running", pods(1), s, 2, datetime(2026, 12, 1, 13, 0, 30, tzinfo=timezone.utc))
    u = accrue(u, "Running", "Running", pods(1), s, 2, datetime(2026, 12, 1, 13, 1, 30, tzinfo=timezone.utc))
    assert [(r.run, r.wall_seconds, r.gpu_seconds) for r in u.runs] == [(1, 100.0, 200.0), (2, 90.0, 120.0)]
    assert (u.wall_seconds, u.gpu_seconds) == (190.0, 320.0)


def test_the_price_table_prices_gpu_hours_and_the_pinned_node_type():
    prices = PriceTable.model_validate({"currency": "EUR", "gpu": {"nvidia.com/gpu": 2.5}, "nodeLabel": "node.kubernetes.io/instance-type",
                                        "node": {"gpu-8x": 10.0}})  # fmt: skip
    s = gpu_spec(nodes=2, gpus=4, nodeSelector={"node.kubernetes.io/instance-type": "gpu-8x"})
    u = accrue(
        accrue(None, "Running", "Running", pods(2), s, 1, T0, prices),
        "Running",
        "Running",
        pods(2),
        s,
        1,
        T0 + timedelta(hours=1),
        prices,
    )
    # 2 nodes x 1 h = 2 node-hours x 10 + 8 GPU-hours x 2.5
    assert (
        u.estimated_cost == pytest.approx(40.0)
        and u.currency == "EUR"
        and u.runs[0].estimated_cost == pytest.approx(40.0)
    )
    unpriced = PriceTable(gpu={"amd.com/gpu": 1.0})
    cpu_only = spec()
    assert accrue(None, "Running", "Running", pods(1), cpu_only, 1, T0, unpriced).estimated_cost is None


@given(st.lists(st.tuples(st.integers(0, 3600), st.sampled_from(["Pending", "Initializing", "Running", "Restarting", "Suspended"]),
                          st.integers(0, 4), st.integers(1, 3)), max_size=20))  # fmt: skip
def test_figures_never_fall_and_the_total_is_the_sum_of_the_runs(steps):
    s = gpu_spec(nodes=4, gpus=2)
    usage: Usage | None = None
    phase, at, run = "Pending", T0, 1
    for seconds, new_phase, running, run_step in steps:
        at += timedelta(seconds=seconds)
        run = max(run, run_step)
        before = usage or Usage()
        usage = accrue(usage, phase, new_phase, pods(running), s, run, at)
        assert usage.wall_seconds >= before.wall_seconds and usage.gpu_seconds >= before.gpu_seconds
        assert usage.gpu_seconds == pytest.approx(usage.node_seconds * 2)
        assert usage.node_seconds == pytest.approx(sum(r.node_seconds for r in usage.runs), abs=1e-6)
        phase = new_phase
