"""Checkpoints, and publishing directories to the output store: files first, then manifest.json, then COMPLETE.

A reader trusts a directory only when COMPLETE is there, so a crash mid-upload
leaves something ignored, never something half-read.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    MANIFEST_FILE,
    ArtifactManifest,
    FileEntry,
    checkpoint_dir_name,
)

from kubetune_trainer.log import log
from kubetune_trainer.state import TrainState
from kubetune_trainer.storage import OutputStore, cache_root

TRAINER_STATE_FILE = "trainer_state.json"


def file_table(local_dir: Path, only: list[str] | None = None) -> dict[str, FileEntry]:
    """{relative path: FileEntry(sha256, size)} for every file under local_dir (markers excluded), or the `only` ones."""
    return dict(ArtifactManifest.of(local_dir, only).files)


def upload_files(store: OutputStore, local_dir: Path, rel: str, files: dict[str, Any]) -> None:
    store.put_files([(local_dir / name, f"{rel}/{name}" if rel else name) for name in files])


def seal(store: OutputStore, rel: str, files: dict[str, FileEntry], job: str | None = None, step: int | None = None) -> None:
    """Write the manifest, then the COMPLETE marker: the last two writes of any published directory."""
    manifest = ArtifactManifest(files=files, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), job=job, step=step)
    prefix = f"{rel}/" if rel else ""
    store.put_text(prefix + MANIFEST_FILE, manifest.to_text())
    store.put_text(prefix + COMPLETE_MARKER, f"{manifest.created_at}\n")


def checkpoint_rel(step: int) -> str:
    return f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(step)}"


def complete_checkpoints(store: OutputStore) -> list[int]:
    """Steps of the checkpoints that have their COMPLETE marker, oldest first."""
    steps = []
    for name in store.list_dirs(CHECKPOINTS_DIR):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            step = int(name[len(CHECKPOINT_PREFIX) :])
            if store.exists(f"{checkpoint_rel(step)}/{COMPLETE_MARKER}"):
                steps.append(step)
    return sorted(steps)


def prune_checkpoints(store: OutputStore, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers below the newest."""
    complete = complete_checkpoints(store)
    keep_steps = set(complete[-keep:])
    newest = complete[-1] if complete else -1
    for name in store.list_dirs(CHECKPOINTS_DIR):
        digits = name[len(CHECKPOINT_PREFIX) :]
        if not digits.isdigit():
            continue
        step = int(digits)
        if step not in keep_steps and step <= newest:
            store.delete_dir(checkpoint_rel(step))


# --- checkpoints of a running job: every rank takes part ----------------------


@dataclass(frozen=True)
class Checkpointer:
    """Saves and restores Accelerate's state (model, optimizer, scheduler, RNG) plus TrainState.

    Each node stages its ranks' files in a node-local directory and uploads them; rank 0 seals
    the checkpoint (manifest, then COMPLETE) once every node is done.
    """

    accelerator: Any
    store: OutputStore
    job_key: str  # the job's uid (or name): checkpoints of one job never mix with another's
    world_size: int
    keep: int

    def local_dir(self, step: int) -> Path:
        return cache_root() / "checkpoints" / self.job_key / checkpoint_rel(step)

    def save(self, state: TrainState) -> None:
        acc, step = self.accelerator, state.step
        local = self.local_dir(step)
        if acc.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(local / "accelerate"))
        if acc.is_main_process:
            (local / TRAINER_STATE_FILE).write_text(json.dumps(vars(state)))
        acc.wait_for_everyone()
        files = file_table(local) if acc.is_local_main_process else {}
        if acc.is_local_main_process:
            upload_files(self.store, local, checkpoint_rel(step), files)
        parts = self._gather(files)
        if acc.is_main_process:
            merged = {k: v for part in parts for k, v in (part or {}).items()}
            seal(self.store, checkpoint_rel(step), merged, step=step)
            prune_checkpoints(self.store, self.keep)
            log(f"checkpoint step {step} -> {self.store.url(checkpoint_rel(step))}")
        acc.wait_for_everyone()

    def _gather(self, files: dict[str, Any]) -> list[Any]:
        if self.world_size == 1:
            return [files]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, files)
        return gathered

    def resume(self, previous: OutputStore | None = None) -> TrainState | None:
        """Load the newest complete checkpoint into the prepared objects; its TrainState, or None.
        Without one of its own, a run continues `previous` (another run's output, spec.output.resumeFrom)."""
        store, steps = self.store, complete_checkpoints(self.store)
        if not steps and previous is not None:
            store, steps = previous, complete_checkpoints(previous)
        if not steps:
            return None
        step, acc = steps[-1], self.accelerator
        local = self.local_dir(step)
        if acc.is_local_main_process:  # the first process on each node fetches; the others wait
            shutil.rmtree(local, ignore_errors=True)
            store.get_dir(checkpoint_rel(step), local)
        acc.wait_for_everyone()
        acc.load_state(str(local / "accelerate"))
        state = TrainState(**json.loads((local / TRAINER_STATE_FILE).read_text()))
        origin = "" if store is self.store else f" of {store.uri}"
        log(f"resumed from checkpoint step {step}{origin} (epoch {state.epoch}, batch {state.batches_in_epoch})")
        return state
