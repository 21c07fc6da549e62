"""The network check before step 0 (spec.distributed.networkCheck), run by every rank once the process group is up.

1. Every rank names its pod in torchrun's store (rank 0's rendezvous port, which every rank has reached) and
   waits there for all the others: a rank still fetching the model is not a network fault.
2. Under a deadline of networkCheck.timeoutSeconds: a ring of point-to-point messages over the training
   backend (rank r sends to r+1 while receiving from r-1), 4 bytes for latency, `megabytes` for bandwidth,
   then one all-reduce of `megabytes`. NCCL connects lazily, at the first message, and a blocked port hangs it
   silently: when the deadline passes the rank writes a NetworkUnreachable termination message naming its pod,
   the peers of the stage it was in and the backend, and exits at once.
3. Rank 0 gathers each receiver's figures: the NetworkReport goes to the progress report (status.network)
   and metrics.json.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from kubetune.api.contract import ENV_POD_NAME, ExitCode
from kubetune.api.models import NetworkCheckSpec, NetworkPair, NetworkReport

from kubetune_trainer.errors import write_termination_message
from kubetune_trainer.log import log

LATENCY_ROUNDS = 20
BANDWIDTH_ROUNDS = 3  # after one round that warms the connection up
ARRIVAL_TIMEOUT = timedelta(hours=1)  # ranks reach the check at their own pace (model fetch, tokenizing)
KEY = "kubetune/network/"


class Deadline:
    """A timer that ends the process with NETWORK_UNREACHABLE unless the check finishes first. `stage` says
    what the rank is waiting for when it fires."""

    def __init__(self, seconds: float, me: str, backend: str):
        self.seconds, self.me, self.backend = seconds, me, backend
        self.stage = "the first exchange"
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        message = (
            f"pod {self.me} could not complete {self.stage} over {self.backend} within {self.seconds:g}s. "
            f"{self.backend} connects between the gang's pods on ephemeral TCP ports (NCCL also over InfiniBand/RoCE): "
            "a NetworkPolicy or firewall must allow every TCP port among them; see docs/distributed.md#network-policy"
        )
        print(f"[kubetune] error: {message}", flush=True)
        write_termination_message(ExitCode.NETWORK_UNREACHABLE, message)
        os._exit(int(ExitCode.NETWORK_UNREACHABLE))


def pod_names(rank: int, world: int) -> list[str]:
    """Every rank's pod (with its rank), through torchrun's store, once all ranks have arrived."""
    store = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=ARRIVAL_TIMEOUT
    )
    pod = os.environ.get(ENV_POD_NAME) or socket.gethostname()
    store.set(f"{KEY}pod/{rank}", f"{pod} (rank {rank})")
    store.wait([f"{KEY}pod/{r}" for r in range(world)], ARRIVAL_TIMEOUT)
    return [store.get(f"{KEY}pod/{r}").decode() for r in range(world)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ring_seconds(size: int, rounds: int, device: torch.device) -> float:
    """Median seconds of one ring exchange of `size` float32 (send to r+1, receive from r-1), after a warm-up."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.ones(size, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)
    times = []
    for i in range(rounds + 1):
        _sync(device)
        start = time.perf_counter()
        ops = [
            dist.P2POp(dist.isend, send, (rank + 1) % world),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def all_reduce_seconds(size: int, rounds: int, device: torch.device) -> float:
    tensor = torch.ones(size, dtype=torch.float32, device=device)
    times = []
    for i in range(rounds + 1):
        _sync(device)
        start = time.perf_counter()
        dist.all_reduce(tensor)
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    spec: NetworkCheckSpec, device: torch.device, pods: list[str], deadline: Deadline
) -> dict[str, Any]:
    """This rank's figures, gathered on every rank: per receiver (latency s, bandwidth s), and the all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    elements = spec.megabytes * 250_000  # float32: 10^6 bytes per megabyte
    deadline.stage = f"the ring exchange with {pods[(rank - 1) % world]} and {pods[(rank + 1) % world]}"
    latency = ring_seconds(1, LATENCY_ROUNDS, device)
    bandwidth = ring_seconds(elements, BANDWIDTH_ROUNDS, device)
    deadline.stage = f"the all-reduce of {spec.megabytes} MB over all {world} ranks"
    reduce = all_reduce_seconds(elements, BANDWIDTH_ROUNDS, device)
    mine = torch.tensor([latency, bandwidth], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return {"receivers": [tuple(t.tolist()) for t in gathered], "allReduce": reduce}


def build_report(
    spec: NetworkCheckSpec, backend: str, pods: list[str], figures: dict[str, Any], seconds: float
) -> NetworkReport:
    world, size = len(pods), spec.megabytes * 1e6
    pairs = [
        NetworkPair(
            source=(r - 1) % world,
            target=r,
            source_pod=pods[(r - 1) % world].split(" ")[0],
            target_pod=pods[r].split(" ")[0],
            latency_ms=round(lat * 1e3, 3),
            bandwidth_gbps=round(size / bw / 1e9, 3),
        )
        for r, (lat, bw) in enumerate(figures["receivers"])
    ]
    reduce = figures["allReduce"]
    return NetworkReport(
        backend=backend,
        world_size=world,
        megabytes=spec.megabytes,
        all_reduce_ms=round(reduce * 1e3, 3),
        all_reduce_bus_gbps=round(2 * (world - 1) / world * size / reduce / 1e9, 3),
        min_bandwidth_gbps=min(p.bandwidth_gbps for p in pairs),
        max_latency_ms=max(p.latency_ms for p in pairs),
        seconds=round(seconds, 3),
        checked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        pairs=pairs,
    )


def check(spec: NetworkCheckSpec, device: torch.device) -> NetworkReport | None:
    """The check on this rank (every rank calls it); the report, or None when there is nothing to check."""
    if not spec.enabled or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    rank, world, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    pods = pod_names(rank, world)
    start = time.perf_counter()
    with Deadline(spec.timeout_seconds, pods[rank], backend) as deadline:
        figures = measure(spec, device, pods, deadline)
    report = build_report(spec, backend, pods, figures, time.perf_counter() - start)
    if rank == 0:
        log(
            f"network check over {backend}, {world} ranks: all-reduce of {spec.megabytes} MB {report.all_reduce_ms} ms "
            f"({report.all_reduce_bus_gbps} GB/s bus), slowest pair {report.min_bandwidth_gbps} GB/s, "
            f"highest latency {report.max_latency_ms} ms ({report.seconds} s)"
        )
    return report
