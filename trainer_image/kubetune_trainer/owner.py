"""Owned outputs: the first thing a run writes is who owns the output; another owner's run is refused.

The owner is the FineTuneJob's uid and run number on a cluster, `local-<name>` and a run id for
`kubetune run` and the local SDK. A run of the same owner resumes; another owner's run is refused
before training with one line naming the owner and the fix. On a local filesystem rank 0 also
holds a lock (filelock) on the output for as long as it trains, so two concurrent starts of the
same job cannot both train: the second is refused while the first runs. On S3 the owner record
is written with If-None-Match, and read back to see who won.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from filelock import FileLock, Timeout
from kubetune.api.contract import OUTPUT_LOCK, OWNER_FILE, ExitCode
from kubetune.api.trainer_config import TrainerConfig
from kubetune.api.uris import spec_uris

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.storage import OutputStore, local_path

ENV_RUN_ID = (
    "KUBETUNE_RUN_ID"  # set by `kubetune run` (one id per invocation); a pod uses its job's uid and run
)
RUN_FILE = ".kubetune-run.json"  # beside the lock: which process holds it (for the refusal's message)


def owner_record(config: TrainerConfig) -> dict[str, Any]:
    job = config.job
    return {
        "job": job.name, "namespace": job.namespace, "uid": job.uid or job.name, "run": job.run,
        "runId": os.environ.get(ENV_RUN_ID) or f"{job.uid or job.name}/run-{job.run}",
        "host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def same_owner(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("uid"), a.get("run", 1)) == (b.get("uid"), b.get("run", 1))


def describe(owner: dict[str, Any]) -> str:
    return f"job {owner.get('namespace', '?')}/{owner.get('job', '?')} (uid {owner.get('uid', '?')}, run {owner.get('run', 1)})"


class OutputClaim:
    """Rank 0's claim on the output: the owner record checked (and written when absent), the local lock held."""

    def __init__(self, store: OutputStore, config: TrainerConfig):
        self.store, self.me = store, owner_record(config)
        self.lock: FileLock | None = None

    def acquire(self, config: TrainerConfig) -> dict[str, Any]:
        """The owner record; TrainerError (not retryable) when the output is another's, in use, or overlaps an input."""
        store = self.store
        if store.local is not None:
            check_apart(store.local, config)
            store.local.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(store.local / OUTPUT_LOCK))
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                holder = _read_json(store.get_text(RUN_FILE))
                who = (
                    f"run {holder.get('runId')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
                    if holder
                    else "another run"
                )
                raise TrainerError(
                    ExitCode.CONFIG_INVALID,
                    f"spec.output.uri: {store.uri} is in use by {who}; wait for it to finish or choose another output "
                    "(spec.output.uri, kubetune run --output)",
                ) from None
        store.put_text_if_absent(OWNER_FILE, json.dumps(self.me, indent=1))
        owner = _read_json(store.get_text(OWNER_FILE))
        if owner is None or not same_owner(owner, self.me):
            self.release()
            who = describe(owner) if owner else f"an unreadable {OWNER_FILE}"
            raise TrainerError(
                ExitCode.CONFIG_INVALID,
                f"spec.output.uri: {store.uri} belongs to {who}; a job never writes into another's output: choose "
                f"another spec.output.uri (kubetune run --output), or delete {store.uri} to reuse it",
            )
        if self.lock is not None:
            store.put_text(RUN_FILE, json.dumps(self.me))
        return owner

    def release(self) -> None:
        if self.lock is not None and self.lock.is_locked:
            self.lock.release()


def _read_json(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_apart(out: os.PathLike[str], config: TrainerConfig) -> None:
    """The output and every local input compared as the filesystem resolves them (symlinks followed): validation
    compares URIs as written, and a link would let a run write COMPLETE into its own base model."""
    inputs = [(field, uri) for field, uri in spec_uris(config.spec).items() if field != "spec.output.uri"]
    real_out = os.path.realpath(out)
    for field, uri in inputs:
        path = local_path(uri) if uri else None
        if path is None or not path.exists():
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real_out, real]) in (real_out, real):
            raise TrainerError(
                ExitCode.CONFIG_INVALID,
                f"spec.output.uri: {config.spec.output.uri} resolves to {real_out}, which overlaps {field} ({real}): a run "
                "writes its checkpoints, model/ and COMPLETE there; choose an output apart from every input",
            )
