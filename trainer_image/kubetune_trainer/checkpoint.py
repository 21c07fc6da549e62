"""Checkpoints, and publishing directories to the output store: files first, then manifest.json, then COMPLETE.

A reader trusts a directory only when COMPLETE is there, so a crash mid-upload
leaves something ignored, never something half-read. Before a checkpoint is loaded,
every file is checked against its manifest (no file missing or unlisted, each size,
then each sha256, hashed in parallel): one that fails is set aside (renamed
`step-N.set-aside-<time>`, never deleted) and the next older one is tried. A checkpoint
records the config that trained it (trained-spec.json); resuming the same output with
a changed config is refused, naming the fields.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    MANIFEST_FILE,
    ArtifactManifest,
    ExitCode,
    FileEntry,
    ManifestMismatch,
    checkpoint_dir_name,
)
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import changed_fields, resume_fields

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.log import log
from kubetune_trainer.state import GANG_STARTED, TrainState
from kubetune_trainer.storage import OutputStore, cache_root

TRAINER_STATE_FILE = "trainer_state.json"
TRAINED_SPEC_FILE = "trained-spec.json"  # resume_fields() of the spec that trained the checkpoint
SET_ASIDE_MARK = (
    ".set-aside-"  # checkpoints/step-00000010.set-aside-20261206T120000Z: failed verification, kept
)
SET_ASIDE_REASON = "SET_ASIDE"  # in a set-aside checkpoint: why it failed verification
HASH_THREADS = 8  # hashlib releases the GIL: files hash in parallel


def file_table(local_dir: Path, only: list[str] | None = None) -> dict[str, FileEntry]:
    """{relative path: FileEntry(sha256, size)} for every file under local_dir (markers excluded), or the `only` ones."""
    return dict(ArtifactManifest.of(local_dir, only).files)


def verify_dir(local_dir: Path) -> str | None:
    """What is wrong with local_dir against its manifest.json, or None when every file is there, listed, of the
    sealed size and sha256 (ArtifactManifest.verify: sizes first, then sha256 in parallel)."""
    try:
        ArtifactManifest.parse((local_dir / MANIFEST_FILE).read_bytes()).verify(
            local_dir, exact=True, threads=HASH_THREADS
        )
    except ManifestMismatch as exc:
        return str(exc)
    except OSError as exc:
        return f"{MANIFEST_FILE}: unreadable ({exc.strerror or exc})"
    return None


def file_table_names(local_dir: Path) -> list[str]:
    """Relative paths of the files under local_dir, the top-level markers excluded."""
    return [
        p.relative_to(local_dir).as_posix()
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and not (p.parent == local_dir and p.name in (COMPLETE_MARKER, MANIFEST_FILE))
    ]


def upload_files(store: OutputStore, local_dir: Path, rel: str, files: dict[str, Any]) -> None:
    store.put_files([(local_dir / name, f"{rel}/{name}" if rel else name) for name in files])


def seal(
    store: OutputStore, rel: str, files: dict[str, FileEntry], job: str | None = None, step: int | None = None
) -> None:
    """Write the manifest, then the COMPLETE marker: the last two writes of any published directory."""
    manifest = ArtifactManifest(
        files=files, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), job=job, step=step
    )
    prefix = f"{rel}/" if rel else ""
    store.put_text(prefix + MANIFEST_FILE, manifest.to_text())
    store.put_text(prefix + COMPLETE_MARKER, f"{manifest.created_at}\n")


def checkpoint_rel(step: int) -> str:
    return f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(step)}"


def set_aside_name(step: int) -> str:
    return f"{checkpoint_dir_name(step)}{SET_ASIDE_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def set_aside_earlier(store: OutputStore, now: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every checkpoint of this output set aside (by this run or an earlier attempt), with its reason, oldest first."""
    seen = {a["setAsideAs"] for a in now}
    earlier = []
    for name in store.list_dirs(CHECKPOINTS_DIR):
        rel = f"{CHECKPOINTS_DIR}/{name}"
        if SET_ASIDE_MARK in name and store.url(rel) not in seen:
            reason = (store.get_text(f"{rel}/{SET_ASIDE_REASON}") or "reason not recorded").strip()
            original = f"{CHECKPOINTS_DIR}/{name.split(SET_ASIDE_MARK)[0]}"
            earlier.append(
                {"checkpoint": store.url(original), "setAsideAs": store.url(rel), "problem": reason}
            )
    return earlier + now


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
    spec: FineTuneJobSpec | None = None  # what trains: recorded in each checkpoint (TRAINED_SPEC_FILE)

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
            state.gang_seconds = time.time() - GANG_STARTED
            state.world_size = self.world_size
            (local / TRAINER_STATE_FILE).write_text(json.dumps(vars(state)))
            if self.spec is not None:
                (local / TRAINED_SPEC_FILE).write_text(
                    json.dumps(resume_fields(self.spec), indent=1, sort_keys=True)
                )
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

    def _gather(self, files: Any) -> list[Any]:
        if self.world_size == 1:
            return [files]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, files)
        return gathered

    def resume(
        self,
        spec: FineTuneJobSpec,
        previous: OutputStore | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
    ) -> Resumed | None:
        """Load the newest checkpoint that passes verification into the prepared objects; None when there is none.

        Without one of its own, a run continues `previous` (another run's output, spec.output.resumeFrom): a new
        run, whose config may differ (the new hyper-parameters are applied, the changes recorded). A checkpoint
        that fails verification is set aside and the next older one tried; when checkpoints exist and none
        passes, the run fails (CHECKPOINT_INVALID) naming each."""
        set_aside: list[dict[str, str]] = []
        for store in (self.store, previous):
            steps = complete_checkpoints(store) if store is not None else []
            for step in reversed(steps):
                assert store is not None
                problem = self._fetch_and_verify(store, step)
                if problem is None:
                    resumed = self._load(store, step, spec, store is not self.store, optimizer, scheduler)
                    resumed.set_aside = set_aside_earlier(self.store, set_aside)
                    return resumed
                set_aside.append(self._set_aside(store, step, problem))
            if steps and store is not None:
                found = "; ".join(f"{a['checkpoint']}: {a['problem']}" for a in set_aside)
                raise TrainerError(
                    ExitCode.CHECKPOINT_INVALID,
                    f"no usable checkpoint under {store.url(CHECKPOINTS_DIR)}: {found}; each is set aside (renamed "
                    f"*{SET_ASIDE_MARK}<time>, kept for inspection); run again to train from the start, or restore a good copy",
                )
        return None

    def _fetch_and_verify(self, store: OutputStore, step: int) -> str | None:
        """Each node's first process fetches the checkpoint and checks it; every rank gets the same verdict."""
        acc, local, problem = self.accelerator, self.local_dir(step), None
        if acc.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
            store.get_dir(checkpoint_rel(step), local)
            started = time.perf_counter()
            problem = verify_dir(local)
            if problem is None:
                try:
                    TrainState(**json.loads((local / TRAINER_STATE_FILE).read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    problem = f"{TRAINER_STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
            if problem is None:
                log(
                    f"checkpoint step {step} verified against its manifest in {time.perf_counter() - started:.1f}s"
                )
        found = [p for p in self._gather(problem) if p]
        return found[0] if found else None

    def _set_aside(self, store: OutputStore, step: int, problem: str) -> dict[str, str]:
        """Rank 0 renames the failed checkpoint (kept, never loaded again); everyone learns where it went."""
        rel, aside = checkpoint_rel(step), f"{CHECKPOINTS_DIR}/{set_aside_name(step)}"
        if self.accelerator.is_main_process:
            store.move_dir(rel, aside, first=COMPLETE_MARKER)
            store.put_text(f"{aside}/{SET_ASIDE_REASON}", problem + "\n")
            log(
                f"checkpoint {store.url(rel)} failed verification ({problem}); set aside as {store.url(aside)}"
            )
        self.accelerator.wait_for_everyone()
        return {"checkpoint": store.url(rel), "setAsideAs": store.url(aside), "problem": problem}

    def _load(
        self,
        store: OutputStore,
        step: int,
        spec: FineTuneJobSpec,
        new_run: bool,
        optimizer: Any,
        scheduler: Any,
    ) -> Resumed:
        local, url = self.local_dir(step), store.url(checkpoint_rel(step))
        changes = _config_changes(local, spec, url, new_run)
        wanted = (
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if optimizer is not None
            else []
        )
        self._reshard_zero(local)
        self._load_state(local, url, changes)
        state = self._state(store, step, spec, new_run)
        if changes:
            apply_hyperparameters(optimizer, scheduler, wanted)
            if any(
                c.startswith("spec.dataset.") for c in changes
            ):  # the old data position means nothing in new data
                state.epoch, state.batches_in_epoch = 0, 0
        origin = "" if store is self.store else f" of {store.uri}"
        log(f"resumed from checkpoint step {step}{origin} (epoch {state.epoch}, batch {state.batches_in_epoch})"
            + (f"; a new run with the config changes {'; '.join(changes)}" if changes else ""))  # fmt: skip
        return Resumed(state, url, changes)

    def _state(self, store: OutputStore, step: int, spec: FineTuneJobSpec, new_run: bool) -> TrainState:
        """The checkpoint's TrainState for this gang: a gang of another world size continues it only in an elastic
        job (spec.distributed.minNodes), whose global batch and data order do not depend on it (order.py)."""
        state = TrainState(**json.loads((self.local_dir(step) / TRAINER_STATE_FILE).read_text())).resumed(
            same_run=not new_run
        )
        if (
            state.world_size
            and state.world_size != self.world_size
            and not new_run
            and not spec.distributed.elastic
        ):
            raise TrainerError(
                ExitCode.CONFIG_INVALID,
                f"{store.url(checkpoint_rel(step))} was trained by {state.world_size} processes and this gang has "
                f"{self.world_size}; only an elastic job (spec.distributed.minNodes) continues at another world size "
                "(its global batch and data order do not depend on it): restore the old size, or set minNodes on a new output",
            )
        if state.world_size and state.world_size != self.world_size and self.accelerator.is_main_process:
            log(
                f"checkpoint step {step} was trained by {state.world_size} processes; continuing with {self.world_size}"
            )
        return state.at_world_size(self.world_size)

    def _reshard_zero(self, local: Path) -> None:
        """A DeepSpeed ZeRO checkpoint of another world size (elastic resume): each node's first process converts its
        copy to DeepSpeed's universal checkpoint (ds_to_universal: every parameter's weights and optimizer state
        whole), and the engine loads that at this world size."""
        saved = int(json.loads((local / TRAINER_STATE_FILE).read_text()).get("world_size") or 0)
        engine = getattr(getattr(self.accelerator, "deepspeed_engine_wrapped", None), "engine", None)
        if engine is None or not saved or saved == self.world_size:
            return
        sharded = local / "accelerate" / DEEPSPEED_TAG
        if self.accelerator.is_local_main_process:
            universal_checkpoint(sharded, sharded.with_name(DEEPSPEED_TAG + ".universal"))
            sharded.rename(sharded.with_name(DEEPSPEED_TAG + ".sharded"))
            sharded.with_name(DEEPSPEED_TAG + ".universal").rename(sharded)
        self.accelerator.wait_for_everyone()
        engine._config.load_universal_checkpoint = True
        log(f"ZeRO checkpoint of {saved} ranks converted to a universal checkpoint for {self.world_size}")

    def _load_state(self, local: Path, url: str, changes: list[str]) -> None:
        """Accelerate's load_state of the checkpoint at `url`; a model or optimizer it does not fit is refused in one line."""
        try:
            self.accelerator.load_state(str(local / "accelerate"))
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainerError(
                ExitCode.CONFIG_INVALID,
                f"{url} does not fit this job's model or optimizer ({first})"
                + (f"; changed: {'; '.join(changes)}" if changes else "")
                + "; train from the start (spec.output.resumeFrom: fresh, or a new output) or restore the old values",
            ) from exc


def _config_changes(local: Path, spec: FineTuneJobSpec, url: str, new_run: bool) -> list[str]:
    """The resume fields whose values differ from those the checkpoint at `url` was trained with; a run that continues
    (not a new run from it) refuses any, since it would mix two trainings."""
    saved_spec = local / TRAINED_SPEC_FILE
    changes = (
        changed_fields(json.loads(saved_spec.read_text()), resume_fields(spec)) if saved_spec.exists() else []
    )
    if changes and not new_run:
        raise TrainerError(
            ExitCode.CONFIG_INVALID,
            f"{url} was trained with another config ({'; '.join(changes)}); "
            "resuming it would mix two trainings. Either write to a new output (spec.output.uri, kubetune run --output) "
            "or start a new run from this checkpoint with the new config applied (spec.output.resumeFrom: previous "
            "on a cluster; kubetune run --output NEW --resume-from OLD locally), or restore the old values to continue",
        )
    return changes


DEEPSPEED_TAG = "pytorch_model"  # the directory Accelerate's save_state gives DeepSpeed's checkpoint


def universal_checkpoint(sharded: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal over one ZeRO checkpoint directory (in this process: one worker each)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(sharded), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)  # fmt: skip
    ds_to_universal(args)


@dataclass
class Resumed:
    """What resume() loaded: the TrainState, from where, the config changes a new run applied, what was set aside."""

    state: TrainState
    checkpoint: str
    changes: list[str]
    set_aside: list[dict[str, str]] = field(default_factory=list)


def apply_hyperparameters(optimizer: Any, scheduler: Any, wanted: list[dict[str, Any]]) -> None:
    """After load_state: the new config's optimizer settings (learning rate, weight decay, ...) replace the ones
    the checkpoint carried, and the schedule is evaluated at the restored step with the new base rates."""
    if optimizer is None or len(wanted) != len(optimizer.param_groups):
        return
    for group, settings in zip(optimizer.param_groups, wanted, strict=True):
        group.update(settings)
    if scheduler is None:
        return
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper, when prepared
    if hasattr(inner, "base_lrs") and hasattr(inner, "lr_lambdas"):
        inner.base_lrs = [settings.get("initial_lr", settings["lr"]) for settings in wanted]
        for group, base, fn in zip(optimizer.param_groups, inner.base_lrs, inner.lr_lambdas, strict=True):
            group["lr"] = base * fn(inner.last_epoch)
        inner._last_lr = [g["lr"] for g in optimizer.param_groups]
