"""A rank that runs the trainer's network check alone (no model): `torchrun ... network_worker.py MODE OUT`.

MODE `check`: every rank runs it; rank 0 writes the NetworkReport (camelCase JSON) to OUT.
MODE `silent-peer`: rank 1 arrives (names its pod in the store) and then never answers over the backend, as a
peer whose NCCL/gloo ports a NetworkPolicy drops would: rank 0's deadline must end it with NETWORK_UNREACHABLE.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from kubetune.api.models import NetworkCheckSpec
from kubetune_trainer import netcheck


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "silent-peer" and rank == 1:
        netcheck.pod_names(rank, world)
        time.sleep(60)
        return
    report = netcheck.check(NetworkCheckSpec(timeout_seconds=5), torch.device("cpu"))
    if rank == 0 and report is not None:
        out.write_text(report.model_dump_json(by_alias=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
