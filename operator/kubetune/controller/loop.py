"""The reconcile loop: watch events fill the Store and queue the FineTuneJob they concern; a fixed number
of workers reconcile queued FineTuneJobs (in threads: the Kubernetes client blocks); one poller reads
rank 0's /progress of running jobs within a fixed request budget and queues a job when its progress
says something new.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import kopf

from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT
from kubetune.controller import reconcile
from kubetune.controller.cluster import Cluster
from kubetune.controller.metrics import METRICS
from kubetune.controller.settings import Settings
from kubetune.controller.store import Key, Store, WorkQueue, key_of
from kubetune.status.derive import iso
from kubetune.status.disruption import reported_checkpoint
from kubetune.status.progress import progress_url, to_progress

log = logging.getLogger("kubetune.controller")


def progress_interval(running: int, poll_interval: float, budget: float) -> float:
    """Seconds between two reads of one job: the configured interval, stretched so that the whole fleet
    costs at most `budget` reads per second."""
    return max(poll_interval, running / budget)


class Controller:
    """The loop over one `Store`, one `Settings` and one `Cluster` (a KubeClient in the operator; a fake in
    tests): nothing it uses is process-global."""

    def __init__(self, settings: Settings, kube: Cluster) -> None:
        self.settings = settings
        self.kube = kube
        self.store = Store()
        self.queue: WorkQueue | None = None
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[None]] = []
        self._unqueued: set[Key] = set()
        """FineTuneJobs the index pass put into the store whose event handler has not queued them yet."""
        self.reconciles = 0
        self.progress_reads = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.queue = WorkQueue()
        for key in self.store.keys():  # events seen before start
            self.queue.add(key)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._poll_progress()))
        self._tasks.append(asyncio.create_task(self._report()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Let passes already running finish their writes: a replica that releases the leader Lease after this
        # must have stopped writing before a standby starts.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(
            None, self.kube.flush_events, 5.0
        )  # the Events still queued

    def _enqueue(self, key: Key) -> None:
        if self.queue is not None:
            self.queue.add(key)

    # ---------------------------------------------------------------- watch events (on the event loop)

    def on_finetunejob_listed(self, obj: dict[str, Any]) -> None:
        """Kopf's index pass over a FineTuneJob event (operator_main.finetunejobs_listed): into the store at
        once, queued by its event handler (`on_finetunejob`), which Kopf runs only once every FineTuneJob
        listed at start is in the store."""
        if self.store.put_ftj(obj):
            self._unqueued.add(key_of(obj))

    def on_finetunejob(self, event_type: str | None, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        if event_type == "DELETED":
            self._unqueued.discard(key)
            self.store.drop_ftj(key)
            if self.queue is not None:
                self.queue.forget(key)
            return
        # New to the store here, or in the index pass of the same event. The echo of our own status write
        # (already in the store from the write's answer) queues nothing.
        if self.store.put_ftj(obj) or key in self._unqueued:
            self._unqueued.discard(key)
            self._enqueue(key)

    def on_child(self, kind: str, event_type: str | None, obj: dict[str, Any]) -> None:
        owner = (
            self.store.drop_child(kind, obj) if event_type == "DELETED" else self.store.put_child(kind, obj)
        )
        if owner is not None:
            self._enqueue(owner)

    # ---------------------------------------------------------------- workers

    async def _worker(self, n: int) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            delay: float | None = None
            try:
                ctx = contextvars.copy_context()
                delay = await loop.run_in_executor(self._executor, ctx.run, self._reconcile, key)
            except kopf.TemporaryError as exc:
                log.warning("%s/%s: %s (again in %ss)", *key, exc, exc.delay)
                delay = float(exc.delay or 10)
            except kopf.PermanentError as exc:
                log.error("%s/%s: %s", *key, exc)
            except Exception:
                log.exception("%s/%s: reconcile failed (again in 10s)", *key)
                delay = 10.0
            finally:
                self.reconciles += 1
                self.queue.done(key)
            if delay is not None and self.store.ftj(key) is not None:
                self.queue.add_after(key, delay)

    async def _report(self, every: float = 30.0) -> None:
        """One log line of counters (bench/operator_scale.py reads it)."""
        while True:
            await asyncio.sleep(every)
            log.info(
                "stats: jobs=%d reconciles=%d api_calls=%d throttled_ms=%d progress_reads=%d progress_targets=%d queued=%d",
                len(self.store.keys()), self.reconciles, self.kube.calls, self.kube.throttled_ms, self.progress_reads,
                len(self.store.progress_targets()), len(self.queue or ()),
            )  # fmt: skip

    def _reconcile(self, key: Key) -> float | None:
        with METRICS.reconciling("reconcile"):
            return reconcile.reconcile(key, self.store, self.settings, self.kube)

    # ---------------------------------------------------------------- progress

    async def _poll_progress(self) -> None:
        """One round reads every running rank 0 once, paced at `progress_budget` reads per second with at most
        `progress_concurrency` in flight; rounds start `progress_interval()` apart."""
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.progress_timeout)
        connector = aiohttp.TCPConnector(limit=s.progress_concurrency, force_close=True)
        sem = asyncio.Semaphore(s.progress_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                started = time.monotonic()
                targets = self.store.progress_targets()
                interval = progress_interval(len(targets), s.poll_interval, s.progress_budget)
                reads = []
                for i, (key, pod, ip) in enumerate(targets):
                    due = started + i / s.progress_budget
                    if (wait := due - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                    await sem.acquire()
                    reads.append(asyncio.create_task(self._read(session, sem, key, pod, ip)))
                if reads:
                    await asyncio.gather(*reads, return_exceptions=True)
                await asyncio.sleep(max(0.05, started + interval - time.monotonic()))

    async def _read(
        self, session: aiohttp.ClientSession, sem: asyncio.Semaphore, key: Key, pod: str, ip: str
    ) -> None:
        try:
            async with session.get(progress_url(ip, DEFAULT_PROGRESS_PORT)) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
            data = None
        finally:
            sem.release()
        self.progress_reads += 1
        if not isinstance(data, dict):
            return
        progress = to_progress(data, iso(reconcile.now()))
        served = data.get("checkpointRequests")
        served = served if isinstance(served, int) and not isinstance(served, bool) else 0
        if self.store.put_progress(key, pod, progress, time.monotonic(), reported_checkpoint(data), served):
            self._enqueue(key)
