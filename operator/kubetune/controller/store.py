"""The operator's memory: what the watches have shown (FineTuneJobs, their Jobs and Pods, keyed by the
owner label) and the work queue of FineTuneJobs to reconcile. No I/O here.

The watch streams (Kopf event handlers) write into `Store`; reconciling reads from it instead of
listing Jobs and Pods, so a cluster at rest costs no API calls. `WorkQueue` has client-go's
semantics: a key waits at most once in the queue, and one key is never reconciled by two workers
at the same time (a change seen meanwhile queues it again once the first pass is done).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune.api.models import CheckpointRecord, Progress
from kubetune.api.names import COMPLETION_INDEX, LABEL_JOB, LABEL_RESTART
from kubetune.status.derive import resumed_unseen

Key = tuple[str, str]
"""(namespace, FineTuneJob name)."""


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def owner_key(obj: dict[str, Any]) -> Key | None:
    """The FineTuneJob a Job or Pod belongs to, by its kubetune.io/job-name label."""
    meta = obj.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(LABEL_JOB)
    return (meta.get("namespace") or "", owner) if owner else None


def _owning_job_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the batch/v1 Job a Kueue Workload belongs to (its owner reference)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/"):
            return str(ref.get("uid") or "") or None
    return None


def slim(obj: dict[str, Any], kind: str = "") -> dict[str, Any]:
    """What the operator reads of an object, kept in memory for every job: no metadata.managedFields (often
    half its size), and no copy of the pod template: a Job without spec.template, a Kueue Workload without
    its spec (its podSets repeat the template). Status, owners and the Job's other spec fields stay. Always a
    copy: the caller's object is not changed."""
    meta = obj.get("metadata") or {}
    if "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    if kind == "Workload" and "spec" in obj:
        obj = {k: v for k, v in obj.items() if k != "spec"}
    elif kind == "Job" and "template" in (obj.get("spec") or {}):
        obj = {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "template"}}
    shared: dict[str, Any] = _shared_strings(obj)
    return shared


def _shared_strings(value: Any) -> Any:
    """A copy whose keys and short strings are interned: thousands of stored objects repeat the same keys and
    values (field names, reasons, label values), each a separate string as the JSON decoder made it; shared,
    the store of 5,000 jobs takes half the memory."""
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: _shared_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared_strings(v) for v in value]
    if type(value) is str and len(value) <= 64:  # a str subclass (an enum member) cannot be interned
        return sys.intern(value)
    return value


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class Seen:
    """A progress read: what rank 0 said, from which pod, and when its step last moved."""

    pod: str
    progress: Progress
    read_at: float
    step_moved_at: float
    checkpoint: CheckpointRecord | None = None
    """The newest checkpoint rank 0 reported (lastCheckpoint)."""
    served: int = 0
    """Checkpoint requests rank 0 has served (checkpointRequests)."""


@dataclass
class Ask:
    """A checkpoint the operator asked of a gang's rank 0 before a disruption (kubetune.controller.checkpoints)."""

    gang: str
    """The Job uid and rank 0 pod it was asked of: a new gang is asked again."""
    cause: str
    asked_at: float
    """time.time() when asked."""
    requested: int | None
    """The trainer's number for the request (None: rank 0 could not be reached)."""
    written: bool = False
    """The checkpoint is written (its Event recorded)."""
    expired: bool = False
    """The wait ran out (its Event recorded)."""


@dataclass
class Store:
    """Thread-safe: watch handlers write on the event loop, reconcile workers read from threads."""

    ftjs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    workloads: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Kueue's Workloads of our Jobs, keyed by the Job's FineTuneJob (through the Job's uid: a Workload carries
    none of our labels, only an owner reference to the Job it admits)."""
    _job_owner: dict[str, Key] = field(default_factory=dict)
    """Job uid -> its FineTuneJob, for Workloads."""
    _orphans: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Workloads seen before their Job (watch order after a restart), by the Job's uid."""
    progress: dict[Key, Seen] = field(default_factory=dict)
    asks: dict[Key, Ask] = field(default_factory=dict)
    """Checkpoint requests outstanding, per FineTuneJob (memory only: an operator restart asks again)."""
    _resumed: dict[str, datetime] = field(default_factory=dict)
    """Job uid -> when this operator first saw it resumed while its status still said Suspended."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------------------------------------------------------- FineTuneJobs

    def put_ftj(self, obj: dict[str, Any]) -> bool:
        """Keep the newest version: our own status write (its response) may be ahead of the watch. False when
        the store already had this version or a newer one (the watch echoing our own write): nothing new."""
        obj = slim(obj)
        key = key_of(obj)
        with self._lock:
            old = self.ftjs.get(key)
            same_object = old is not None and old["metadata"].get("uid") == obj["metadata"].get("uid")
            if same_object and _rv(old or {}) >= _rv(obj) > 0:
                return False
            self.ftjs[key] = obj
        return True

    def resume_seen(self, job: dict[str, Any] | None, at: datetime) -> datetime | None:
        """When the Job was first seen resumed with its status still Suspended (`at` the first time); None, and
        forgotten, once its status has caught up (memory only: after a restart, dated from the first pass)."""
        uid = (job or {}).get("metadata", {}).get("uid")
        with self._lock:
            if not uid or not resumed_unseen(job):
                if uid:
                    self._resumed.pop(uid, None)
                return None
            return self._resumed.setdefault(uid, at)

    def drop_ftj(self, key: Key) -> None:
        with self._lock:
            self.ftjs.pop(key, None)
            self.progress.pop(key, None)
            self.asks.pop(key, None)

    def ftj(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self.ftjs.get(key)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self.ftjs)

    # ---------------------------------------------------------------- children

    def _table(self, kind: str) -> dict[Key, dict[str, dict[str, Any]]]:
        return self.jobs if kind == "Job" else self.workloads if kind == "Workload" else self.pods

    def _owner(self, kind: str, obj: dict[str, Any]) -> Key | None:
        """The FineTuneJob of a Job or Pod (its label) or of a Workload (its Job's), under the lock."""
        if kind != "Workload":
            return owner_key(obj)
        uid = _owning_job_uid(obj)
        return self._job_owner.get(uid) if uid else None

    def put_child(self, kind: str, obj: dict[str, Any]) -> Key | None:
        """A Job, Pod or Workload as the watch (or our own create) saw it; returns its FineTuneJob's key, or None
        when it has none or the store already had this version or a newer one (nothing new to reconcile)."""
        obj = slim(obj, kind)
        name = obj["metadata"]["name"]
        with self._lock:
            owner = self._owner(kind, obj)
            if owner is None:
                if kind == "Workload" and (uid := _owning_job_uid(obj)):
                    self._orphans[uid] = obj  # its Job may come down the watch later
                return None
            table = self._table(kind).setdefault(owner, {})
            old = table.get(name)
            if (
                old is not None
                and old["metadata"].get("uid") == obj["metadata"].get("uid")
                and _rv(old) >= _rv(obj) > 0
            ):
                return None
            table[name] = obj
            if kind == "Job" and (uid := obj["metadata"].get("uid")):
                self._job_owner[uid] = owner
                if (orphan := self._orphans.pop(uid, None)) is not None:
                    self.workloads.setdefault(owner, {})[orphan["metadata"]["name"]] = orphan
        return owner

    def drop_child(self, kind: str, obj: dict[str, Any]) -> Key | None:
        with self._lock:
            owner = self._owner(kind, obj)
            if kind == "Job" and (uid := obj["metadata"].get("uid")):
                self._job_owner.pop(uid, None)
                if owner is not None:  # its Workload goes with it (garbage-collected; no owner to find later)
                    kept = {
                        n: w
                        for n, w in (self.workloads.get(owner) or {}).items()
                        if _owning_job_uid(w) != uid
                    }
                    self.workloads[owner] = kept
                    if not kept:
                        self.workloads.pop(owner, None)
            if kind == "Workload":
                self._orphans.pop(_owning_job_uid(obj) or "", None)
            if owner is None:
                return None
            table = self._table(kind)
            children = table.get(owner) or {}
            old = children.get(obj["metadata"]["name"])
            if old is not None and old["metadata"].get("uid") == obj["metadata"].get("uid"):
                children.pop(obj["metadata"]["name"], None)
            if not children:
                table.pop(owner, None)
        return owner

    def children(self, key: Key) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(Jobs, Pods) of one FineTuneJob."""
        with self._lock:
            return list((self.jobs.get(key) or {}).values()), list((self.pods.get(key) or {}).values())

    def workload_of(self, key: Key, job: dict[str, Any] | None) -> dict[str, Any] | None:
        """Kueue's Workload for `job` (one of this FineTuneJob's Jobs), if the watch has shown one."""
        uid = ((job or {}).get("metadata") or {}).get("uid")
        if not uid:
            return None
        with self._lock:
            for wl in (self.workloads.get(key) or {}).values():
                if _owning_job_uid(wl) == uid:
                    return wl
        return None

    # ---------------------------------------------------------------- progress

    def progress_targets(self) -> list[tuple[Key, str, str]]:
        """(key, pod name, pod IP) of every running rank 0 of the current gang of a FineTuneJob not finished."""
        out = []
        with self._lock:
            for key, pods in self.pods.items():
                ftj = self.ftjs.get(key)
                if ftj is None:
                    continue
                status = ftj.get("status") or {}
                if status.get("phase") in ("Succeeded", "Failed", "Suspended"):
                    continue
                gen = str(int(status.get("restarts") or 0))
                for pod in pods.values():
                    meta, st = pod["metadata"], pod.get("status") or {}
                    if (
                        (meta.get("annotations") or {}).get(COMPLETION_INDEX) == "0"
                        and (meta.get("labels") or {}).get(LABEL_RESTART) == gen
                        and st.get("phase") == "Running"
                        and st.get("podIP")
                        and not meta.get("deletionTimestamp")
                    ):
                        out.append((key, meta["name"], st["podIP"]))
        return out

    def put_progress(
        self, key: Key, pod: str, progress: Progress, now: float, checkpoint: CheckpointRecord | None = None,
        served: int = 0,
    ) -> bool:  # fmt: skip
        """Record a read; True when it says something new (anything but the read time changed)."""
        with self._lock:
            old = self.progress.get(key)
            moved = old is None or old.pod != pod or old.progress.step != progress.step
            since = now if old is None or moved else old.step_moved_at
            self.progress[key] = Seen(pod, progress, now, since, checkpoint, served)
            if old is None or old.pod != pod or (old.checkpoint, old.served) != (checkpoint, served):
                return True
            return old.progress.model_copy(update={"updated_at": None}) != progress.model_copy(
                update={"updated_at": None}
            )

    def seen_progress(self, key: Key) -> Seen | None:
        with self._lock:
            return self.progress.get(key)


class WorkQueue:
    """Deduplicating queue of keys for asyncio workers; `add` is safe from any thread via `add_threadsafe`."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._again: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Key) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_threadsafe(self, key: Key) -> None:
        self._loop.call_soon_threadsafe(self.add, key)

    def add_after(self, key: Key, delay: float) -> None:
        """Queue `key` in `delay` seconds (an earlier wake-up already set for it wins)."""
        when = self._loop.time() + delay
        old = self._timers.get(key)
        if old is not None and not old.cancelled() and old.when() <= when:
            return
        if old is not None:
            old.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = self._loop.call_at(when, fire)

    async def get(self) -> Key:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: Key) -> None:
        self._active.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def forget(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
