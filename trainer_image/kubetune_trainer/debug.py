"""The one seam for test hooks. Production pods never set these variables; tests do.

- KUBETUNE_DEBUG_STOP_AT_STEP=N: act as if SIGTERM came at step N (checkpoint, exit 143).
- KUBETUNE_DEBUG_HANG_AT_STEP=N (and KUBETUNE_DEBUG_HANG_RANK=r, default 0): global rank r stops stepping
  for good after step N, as a rank stuck in a collective would (the hang watchdog's test).
- KUBETUNE_DEBUG_DIR=dir: at the end each rank writes dir/rank-<r>.json with the world size
  torch.distributed saw and a digest of its trained weights, so tests can prove ranks trained together;
  and at every optimizer step it appends the examples it trains on (a digest of each one's tokens) to
  dir/seen-rank-<r>.jsonl, so tests can compare the examples two runs saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENV_DEBUG_DIR = "KUBETUNE_DEBUG_DIR"
ENV_DEBUG_STOP_AT_STEP = "KUBETUNE_DEBUG_STOP_AT_STEP"
ENV_DEBUG_HANG_AT_STEP = "KUBETUNE_DEBUG_HANG_AT_STEP"
ENV_DEBUG_HANG_RANK = "KUBETUNE_DEBUG_HANG_RANK"


@dataclass(frozen=True)
class DebugHooks:
    stop_at_step: int = 0
    dump_dir: Path | None = None
    hang_at_step: int = 0
    hang_rank: int = 0

    @classmethod
    def from_env(cls) -> DebugHooks:
        env = os.environ
        dump = env.get(ENV_DEBUG_DIR)
        return cls(
            stop_at_step=int(env.get(ENV_DEBUG_STOP_AT_STEP, "0")),
            dump_dir=Path(dump) if dump else None,
            hang_at_step=int(env.get(ENV_DEBUG_HANG_AT_STEP, "0")),
            hang_rank=int(env.get(ENV_DEBUG_HANG_RANK, "0")),
        )

    def preempt_at(self, step: int) -> bool:
        return self.stop_at_step > 0 and step == self.stop_at_step

    def hangs_at(self, step: int, rank: int) -> bool:
        return self.hang_at_step > 0 and step == self.hang_at_step and rank == self.hang_rank

    def hang_if_asked(self, step: int, rank: int) -> None:
        """Stop stepping for good on the rank and step asked for (the watchdog ends the process)."""
        while self.hangs_at(step, rank):
            time.sleep(3600)

    def record_seen(self, rank: int, epoch: int, step: int, group: list[dict[str, Any]]) -> None:
        """One line per optimizer step of this rank: {epoch, step, rank, examples: [token digest, ...]}."""
        if self.dump_dir is None:
            return
        examples = [example_digest(seq) for batch in group for seq in sequences(batch)]
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        with (self.dump_dir / f"seen-rank-{rank}.jsonl").open("a") as out:
            out.write(json.dumps({"epoch": epoch, "step": step, "rank": rank, "examples": examples}) + "\n")

    def dump_rank_state(
        self, accelerator: Any, model: Any, world_size: int, zero3: bool, loss_curve: list[dict[str, float]]
    ) -> None:
        if self.dump_dir is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        gather: Any = contextlib.nullcontext()
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params)
        with gather:
            digest = hashlib.sha256(
                b"".join(p.detach().float().cpu().numpy().tobytes() for p in params)
            ).hexdigest()
            norm = float(sum(p.detach().float().norm() ** 2 for p in params) ** 0.5)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "worldSize": world_size, "distributedType": str(accelerator.distributed_type),
                  "acceleratorProcesses": accelerator.num_processes, "digest": digest, "norm": norm, "lossCurve": loss_curve}  # fmt: skip
        (self.dump_dir / f"rank-{rank}.json").write_text(json.dumps(record))


def sequences(batch: dict[str, Any]) -> list[list[int]]:
    """The examples of a micro-batch as token lists: padded rows cut by their attention mask, packed and flattened
    rows split where position_ids restart at 0."""
    ids = batch["input_ids"].tolist()
    if "attention_mask" in batch:
        return [
            [t for t, m in zip(row, mask, strict=True) if m]
            for row, mask in zip(ids, batch["attention_mask"].tolist(), strict=True)
        ]
    out: list[list[int]] = []
    for row, positions in zip(ids, batch["position_ids"].tolist(), strict=True):
        for token, position in zip(row, positions, strict=True):
            if position == 0:
                out.append([])
            out[-1].append(token)
    return out


def example_digest(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]
