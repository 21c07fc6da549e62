"""spec.tracking: rank 0 reports the run to MLflow and Weights & Biases, never at the training's expense.

- Before training, `start_tracking()` connects to each tracker (an unreachable server or refused
  credentials end the job there, one line naming the URI or the Secret) and finds this run: a restarted
  gang continues the same MLflow run (looked up by the tags kubetune.uid and kubetune.output) and the
  same W&B run (its id is derived from them), and skips every step the tracker already holds.
- While training, `Tracker.observe(state)` hands the new loss-curve and evaluation points to one worker
  thread per tracker through a bounded queue: a full queue drops (and counts) the points rather than
  wait, and a tracker that goes away is retried a few times, counted, and warned about once.
- At the end, `Tracker.finish()` sends the summary figures, the model card and its plots, the tags that
  link back to the job and its artifacts, registers a model version (MLflow `registerAs`, only for a
  model that passed its gate), and closes the runs. `close()` alone (a failure or a preemption) flushes
  what is queued, for a bounded time.

Credentials come only from the environment (env from the Secrets the spec names): the MLflow client
reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, the W&B client WANDB_API_KEY.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from kubetune.api.contract import ExitCode
from kubetune.api.models import MlflowTracking, TrackingStatus, WandbTracking
from kubetune.api.trainer_config import TrainerConfig

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.log import log
from kubetune_trainer.state import TrainState

QUEUE_POINTS: Final = 10_000  # points waiting per tracker; beyond that new points are dropped (and counted)
RETRIES: Final = 3  # sends of one batch before its points count as failed
BACKOFF_SECONDS: Final = 1.0  # doubled after each failed send
REQUEST_TIMEOUT_SECONDS: Final = 10  # one HTTP request to a tracker while training
CONNECT_TIMEOUT_SECONDS: Final = (
    60  # one request of the start-up check (a cold server answers its first slowly)
)
CONNECT_TRIES: Final = 3  # start-up checks before the tracker counts as unreachable
FLUSH_SECONDS: Final = 30.0  # how long the end of the run waits for queued points
BATCH_POINTS: Final = 500  # points per send (MLflow's log_batch takes up to 1,000 metrics)

TAG_UID: Final = "kubetune.uid"
TAG_OUTPUT: Final = "kubetune.output"
_RUN_SUFFIX = re.compile(r"/run-(\d+)/?$")


@dataclass(frozen=True)
class Point:
    key: str
    value: float
    step: int


def run_number(output_uri: str) -> int:
    """The run an output belongs to: run 1 writes to spec.output.uri, run n to `<uri>/run-<n>` (kubetune.status.runs)."""
    found = _RUN_SUFFIX.search(output_uri)
    return int(found.group(1)) if found else 1


def points_of(record: dict[str, Any]) -> list[Point]:
    """A loss-curve or evaluation record ({"step": n, "loss": x, ...}) as points; non-numbers are left out."""
    step = int(record["step"])
    return [
        Point(key, float(value), step)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) and value == value
    ]


def new_points(points: Iterable[Point], floors: dict[str, int]) -> list[Point]:
    """The points above each key's floor (the last step the tracker holds), raising the floors: a restarted
    gang re-trains the steps after its checkpoint, and the tracker keeps the first copy of each step."""
    out = []
    for p in points:
        if p.step > floors.get(p.key, -1):
            floors[p.key] = p.step
            out.append(p)
    return out


def hyper_parameters(config: TrainerConfig, backend: str | None = None) -> dict[str, str]:
    """The resolved hyper-parameters as flat `block.field` strings (what was trained, and how)."""
    spec = config.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    wanted = (
        "model",
        "method",
        "objective",
        "lora",
        "promptTuning",
        "prefixTuning",
        "ia3",
        "dpo",
        "freeze",
        "training",
        "distributed",
    )
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = str(value)[:500]

    for key in wanted:
        if key in spec:
            walk(key, spec[key])
    dataset = config.spec.dataset
    flat.update({"dataset.train": str(dataset.train or [s.path for s in dataset.sources]), "dataset.eval": str(dataset.eval),
                 "dataset.maxSeqLength": str(dataset.max_seq_length), "dataset.packing": str(dataset.packing),
                 "worldSize": str(config.world_size), "gradientAccumulationSteps": str(config.gradient_accumulation_steps)})  # fmt: skip
    if backend:
        flat["backend"] = backend
    return flat


# ------------------------------------------------------------------ one worker per tracker


class Sink(Protocol):
    """One tracker: `send` may raise (the worker retries); the rest run on the caller's thread at the end."""

    name: str
    where: str  # what a warning names: the URI, or the project

    def send(self, points: list[Point]) -> None: ...


@dataclass
class Channel:
    """A bounded queue and the thread that drains it into one sink."""

    sink: Sink
    capacity: int = QUEUE_POINTS
    retries: int = RETRIES
    backoff: float = BACKOFF_SECONDS
    sent: int = 0
    dropped: int = 0  # the queue was full
    failed: int = 0  # sent `retries` times in vain
    warned: bool = False
    in_flight: int = 0  # points of the batch being sent
    _queue: queue.Queue[Point | None] = field(init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(self.capacity)
        self._thread = threading.Thread(target=self._run, name=f"kubetune-{self.sink.name}", daemon=True)
        self._thread.start()

    def put(self, points: Iterable[Point]) -> None:
        """Never blocks: a full queue drops the point."""
        for p in points:
            try:
                self._queue.put_nowait(p)
            except queue.Full:
                self.dropped += 1
                self._warn(f"its queue is full ({self.capacity} points)")

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Point] = []
            item = self._queue.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH_POINTS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if batch:
                self.in_flight = len(batch)
                self._deliver(batch)
                self.in_flight = 0
            for _ in range(len(batch) + stopping):
                self._queue.task_done()

    def _deliver(self, batch: list[Point]) -> None:
        delay = self.backoff
        for attempt in range(self.retries):
            try:
                self.sink.send(batch)
                self.sent += len(batch)
                return
            except Exception as exc:  # a tracker's failure must never reach training
                if attempt == self.retries - 1:
                    self.failed += len(batch)
                    self._warn(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    return
                time.sleep(delay)
                delay *= 2

    def _warn(self, why: str) -> None:
        if not self.warned:
            self.warned = True
            log(f"warning: {self.sink.name} at {self.sink.where} is not taking metrics ({why}); training goes on, "
                "later points are still tried; counts in metrics.json tracking")  # fmt: skip

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until every point put so far was delivered (or counted); whether it was."""
        deadline = time.monotonic() + timeout
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                done.wait(left)
        return True

    def stop(self, timeout: float) -> None:
        """Deliver what is queued (up to `timeout` seconds), then end the worker."""
        started = time.monotonic()
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=max(1.0, timeout - (time.monotonic() - started)))

    def counts(self) -> dict[str, int]:
        # queued: not yet delivered nor counted as failed, the batch in flight included (a send still retrying when
        # the run ends is neither sent nor failed)
        waiting = sum(1 for item in list(self._queue.queue) if item is not None)
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": waiting + self.in_flight,
        }


# ------------------------------------------------------------------ MLflow


def _mlflow_env(timeout: int) -> None:
    """One request at a time, bounded: the worker retries, not the client (its default backs off for minutes)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)


def _mlflow_refused(spec: MlflowTracking, exc: Exception) -> TrainerError:
    """An MLflow client error at start-up -> one line naming the URI or the Secret."""
    text = str(exc)
    status = getattr(exc, "get_http_status_code", lambda: None)()
    code = str(getattr(exc, "error_code", ""))
    if (
        status in (401, 403)
        or "401" in text[:200]
        or "403" in text[:200]
        or code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    ):
        where = (
            f"the credentials in Secret {spec.credentials_secret!r}"
            if spec.credentials_secret
            else "no credentials"
        )
        fix = (
            "fix the Secret's MLFLOW_TRACKING_USERNAME/PASSWORD (or _TOKEN)"
            if spec.credentials_secret
            else "set spec.tracking.mlflow.credentialsSecret"
        )
        return TrainerError(
            ExitCode.CREDENTIALS_INVALID, f"spec.tracking.mlflow: {spec.uri} refused {where}; {fix}"
        )
    first = text.splitlines()[0][:200] if text else ""
    if _unreachable(exc):
        why = (
            "timed out"
            if "timed out" in text
            else "connection refused"
            if "refused" in text
            else "no connection"
        )
        return TrainerError(ExitCode.INFRASTRUCTURE, f"spec.tracking.mlflow.uri {spec.uri}: unreachable ({why}); "
                            "check the address and that the pods can reach it")  # fmt: skip
    return TrainerError(
        ExitCode.CONFIG_INVALID, f"spec.tracking.mlflow: {spec.uri} answered {type(exc).__name__}: {first}"
    )


def _unreachable(exc: Exception) -> bool:
    text = str(exc)
    return any(s in text for s in ("Connection", "connection", "Max retries", "timed out", "Name or service"))


class MlflowSink:
    name = "MLflow"

    def __init__(self, spec: MlflowTracking, config: TrainerConfig):
        _mlflow_env(CONNECT_TIMEOUT_SECONDS)
        from mlflow.tracking import MlflowClient

        self.spec, self.config = spec, config
        self.where = spec.uri
        self.client = MlflowClient(tracking_uri=spec.uri, registry_uri=spec.uri)
        self.run_id = ""
        self.experiment_id = ""
        self.floors: dict[str, int] = {}
        self.resumed = False

    def tags(self) -> dict[str, str]:
        job = self.config.job
        return {TAG_UID: job.uid or job.name, TAG_OUTPUT: self.config.spec.output.uri, "kubetune.namespace": job.namespace,
                "kubetune.name": job.name, "kubetune.run": str(run_number(self.config.spec.output.uri))}  # fmt: skip

    def connect(self, params: dict[str, str]) -> None:
        """Find or create the experiment and this run (a restarted gang continues it) and log the
        hyper-parameters, with a few tries; the floors per metric. Then requests get the training-time timeout."""
        for attempt in range(CONNECT_TRIES):
            try:
                self._connect()
                self.log_params(params)
                break
            except TrainerError as error:
                if error.exit_code != ExitCode.INFRASTRUCTURE or attempt == CONNECT_TRIES - 1:
                    raise
                time.sleep(2**attempt)
        _mlflow_env(REQUEST_TIMEOUT_SECONDS)

    def _connect(self) -> None:
        spec = self.spec
        try:
            experiment = self.client.get_experiment_by_name(spec.experiment)
            self.experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(spec.experiment)
            )
            tags = self.tags()
            query = f"tags.`{TAG_UID}` = '{_quote(tags[TAG_UID])}' and tags.`{TAG_OUTPUT}` = '{_quote(tags[TAG_OUTPUT])}'"
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=query,
                max_results=1,
                order_by=["attributes.start_time ASC"],
            )
            if found:
                run = found[0]
                self.resumed = True
                self.run_id = run.info.run_id
                for key in run.data.metrics:
                    history = self.client.get_metric_history(self.run_id, key)
                    self.floors[key] = max((m.step for m in history), default=-1)
                if run.info.status != "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
            else:
                run_name = spec.run_name or _default_run_name(self.config)
                self.run_id = self.client.create_run(
                    self.experiment_id, run_name=run_name, tags=tags
                ).info.run_id
        except TrainerError:
            raise
        except Exception as exc:
            raise _mlflow_refused(spec, exc) from None

    @property
    def url(self) -> str:
        return f"{self.spec.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        try:
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        except Exception as exc:
            raise _mlflow_refused(self.spec, exc) from None

    def send(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(p.key, p.value, now, p.step) for p in points])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifacts(self, files: list[Path]) -> None:
        for path in files:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def register(self, name: str, source: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` pointing at `source`; `name/version`."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(
                getattr(exc, "error_code", "")
            ) and "already exists" not in str(exc):
                raise
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=tags)
        return f"{name}/{version.version}"

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _default_run_name(config: TrainerConfig) -> str:
    run = run_number(config.spec.output.uri)
    return config.job.name if run == 1 else f"{config.job.name}-run-{run}"


# ------------------------------------------------------------------ Weights & Biases


def wandb_run_id(config: TrainerConfig) -> str:
    """The same id for every gang of one run (W&B continues it: resume='allow')."""
    raw = f"{config.job.uid or config.job.name}-{run_number(config.spec.output.uri)}"
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:64]


class WandbSink:
    name = "W&B"

    def __init__(self, spec: WandbTracking, config: TrainerConfig, directory: Path):
        self.spec, self.config, self.directory = spec, config, directory
        self.where = (
            f"{spec.base_url or 'wandb'} project {spec.project}"
            if spec.mode == "online"
            else f"offline run in {directory}"
        )
        self.run: Any = None
        self.floor = -1  # W&B refuses steps below its current one

    def connect(self, params: dict[str, str]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        if self.spec.base_url:
            os.environ["WANDB_BASE_URL"] = self.spec.base_url
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(init_timeout=60, x_disable_stats=True, console="off")
        try:
            self.run = wandb.init(project=self.spec.project, entity=self.spec.entity, mode=self.spec.mode, id=wandb_run_id(self.config),
                                  resume="allow", dir=str(self.directory), name=_default_run_name(self.config), config=params,
                                  tags=["kubetune"], settings=settings, reinit="create_new")  # fmt: skip
        except Exception as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            if "401" in text or "API key" in text or "api_key" in text or "Unauthorized" in text:
                raise TrainerError(ExitCode.CREDENTIALS_INVALID, f"spec.tracking.wandb: W&B refused the API key in Secret "
                                   f"{self.spec.api_key_secret!r} (key WANDB_API_KEY); fix the Secret") from None  # fmt: skip
            raise TrainerError(ExitCode.INFRASTRUCTURE, f"spec.tracking.wandb: {self.spec.base_url or 'W&B'} unreachable or refused "
                               f"the run ({type(exc).__name__}: {text})") from None  # fmt: skip
        self.floor = int(getattr(self.run, "step", 0) or 0) - 1

    @property
    def url(self) -> str | None:
        return getattr(self.run, "url", None) if self.spec.mode == "online" else None

    def send(self, points: list[Point]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for p in points:
            by_step.setdefault(p.step, {})[p.key] = p.value
        for step in sorted(by_step):
            if step >= self.floor:
                self.run.log(by_step[step], step=step)
                self.floor = step

    def summarize(self, figures: dict[str, Any]) -> None:
        self.run.summary.update(figures)

    def end(self, exit_code: int) -> Path | None:
        """Close the run and stop W&B's service process, which writes the run file (finish() can return
        before it has); the offline run directory, once its run file stopped growing."""
        import wandb

        run_dir = Path(self.run.dir).parent if self.run is not None and self.spec.mode == "offline" else None
        self.run.finish(exit_code=exit_code)
        wandb.teardown()
        if run_dir is not None:
            wait_until_still(list(run_dir.glob("*.wandb")))
        return run_dir


def wait_until_still(files: list[Path], timeout: float = 30.0, quiet: float = 1.0) -> None:
    """Wait (at most `timeout` s) until the files' sizes have not changed for `quiet` s."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        sizes = [f.stat().st_size if f.exists() else -1 for f in files]
        if sizes != last:
            last, since = sizes, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)


# ------------------------------------------------------------------ the tracker the trainer holds


@dataclass
class Tracker:
    """Rank 0's reporting to every tracker in spec.tracking."""

    config: TrainerConfig
    mlflow: MlflowSink | None = None
    wandb: WandbSink | None = None
    channels: list[Channel] = field(default_factory=list)
    floors: dict[str, int] = field(default_factory=dict)
    status: TrackingStatus = field(default_factory=TrackingStatus)
    offline_dirs: list[Path] = field(default_factory=list)
    ended: bool = False
    gone: set[str] = field(
        default_factory=set
    )  # trackers that failed at the end: nothing more is sent to them
    _seen: dict[str, int] = field(default_factory=dict)  # how much of each TrainState list was handed over

    def observe(self, state: TrainState, eval_loss_before: float | None = None) -> None:
        """Hand the points logged since the last call to the workers (never blocks)."""
        if not self.channels:
            return
        points: list[Point] = []
        if eval_loss_before is not None and "evalLoss0" not in self._seen:
            self._seen["evalLoss0"] = 1
            points.append(Point("evalLoss", float(eval_loss_before), 0))
        for name, records in (("lossCurve", state.loss_curve), ("evals", state.evals)):
            start = self._seen.get(name, 0)
            for record in records[start:]:
                points += points_of(record)
            self._seen[name] = len(records)
        fresh = new_points(points, self.floors)
        for channel in self.channels:
            channel.put(fresh)

    def counts(self) -> dict[str, dict[str, int]]:
        return {c.sink.name: c.counts() for c in self.channels}

    def finish(self, out: Path, metrics: dict[str, Any], files: list[Path], links: dict[str, str],
               register_source: str | None, exit_code: int = 0) -> TrackingStatus:  # fmt: skip
        """Summary figures, the card and its plots, the links back; a model version when `register_source`
        is given (the job succeeded and passed its gate); the runs closed. Failures are warned, never raised."""
        step = int(metrics.get("steps") or 0)
        summary = summary_points(metrics, step)
        for channel in self.channels:
            channel.put(new_points(summary, dict(self.floors)))
        for channel in self.channels:
            channel.flush(FLUSH_SECONDS)
        if self.mlflow is not None:
            self._finish_mlflow(self.mlflow, files, links, register_source, exit_code)
        if (wandb := self.wandb) is not None:
            self._quietly("W&B", "the summary", lambda: wandb.summarize({p.key: p.value for p in summary}))
        self.close(exit_code)
        return self.status

    def _finish_mlflow(
        self, sink: MlflowSink, files: list[Path], links: dict[str, str], source: str | None, exit_code: int
    ) -> None:
        self._quietly("MLflow", "the tags", lambda: sink.set_tags(links))
        self._quietly("MLflow", "the card and plots", lambda: sink.log_artifacts(files))
        name = sink.spec.register_as
        if name and source and exit_code == 0:
            version = self._quietly("MLflow", "the model version", lambda: sink.register(name, source, links))
            if version:
                self.status = self.status.model_copy(update={"mlflow_model_version": version})
                log(f"registered MLflow model version {version} -> {source}")

    def close(self, exit_code: int | None = None) -> None:
        """Flush (bounded) and stop the workers; end the runs: FINISHED or FAILED for a final exit code,
        left open (for the next gang to continue) when None."""
        if self.ended:
            return
        self.ended = True
        for channel in self.channels:
            channel.stop(FLUSH_SECONDS)
        if self.mlflow is not None and exit_code is not None:
            status = "FINISHED" if exit_code == 0 else "FAILED"
            self._quietly("MLflow", "the run's status", lambda: self.mlflow.end(status))  # type: ignore[union-attr]
        if self.wandb is not None and self.wandb.run is not None:
            run_dir = self._quietly("W&B", "the run's end", lambda: self.wandb.end(exit_code or 0))  # type: ignore[union-attr]
            if run_dir is not None:
                self.offline_dirs.append(run_dir)

    def _quietly(self, tracker: str, what: str, call: Callable[[], Any]) -> Any:
        """`call()`, or None when it fails: then nothing more is sent to that tracker, and one line says so."""
        if tracker in self.gone:
            return None
        try:
            return call()
        except Exception as exc:
            self.gone.add(tracker)
            log(f"warning: {tracker} failed on {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                "the rest of the run's ending is not sent to it; the job goes on")  # fmt: skip
            return None


def summary_points(metrics: dict[str, Any], step: int) -> list[Point]:
    """The run's summary figures from metrics.json, at the final step: before/after, throughput, the
    final evaluation, and the interpolation table (one step per alpha x 100, under `interpolation/`)."""
    keys = (
        "evalLossBefore",
        "evalLossAfter",
        "exactMatchBefore",
        "exactMatchAfter",
        "tokensSeen",
        "tokensPerSecond",
        "trainSeconds",
        "wallSeconds",
    )
    figures = {k: metrics.get(k) for k in keys}
    figures.update(
        {
            k: v
            for k, v in metrics.items()
            if k.startswith("evalReward") or k in ("rewardAccuracy", "rewardMargin")
        }
    )
    for k, v in (metrics.get("evaluation") or {}).items():
        figures[f"final/{k}"] = v
    for k, v in (metrics.get("usage") or {}).items():
        figures[f"usage/{k}"] = v
    out = points_of({"step": step, **figures})
    for row in metrics.get("interpolation") or []:
        if isinstance(row, dict) and isinstance(row.get("alpha"), int | float):
            out += [
                Point(f"interpolation/{p.key}", p.value, p.step)
                for p in points_of({**row, "step": round(row["alpha"] * 100)})
                if p.key != "alpha"
            ]
    return out


def start_tracking(config: TrainerConfig, scratch: Path, backend: str | None = None) -> Tracker | None:
    """Connect to every tracker spec.tracking names (rank 0, before training); None without any.
    Raises TrainerError (one line, the URI or the Secret) when one cannot be reached or refuses."""
    spec = config.spec.tracking
    if spec is None or (spec.mlflow is None and spec.wandb is None):
        return None
    tracker = Tracker(config)
    params = hyper_parameters(config, backend)
    if spec.mlflow is not None:
        sink = MlflowSink(spec.mlflow, config)
        sink.connect(params)
        tracker.mlflow = sink
        tracker.floors.update(sink.floors)
        tracker.status = tracker.status.model_copy(
            update={"mlflow_run": sink.url, "mlflow_run_id": sink.run_id}
        )
        log(
            f"MLflow run {sink.url}"
            + (
                f" (continued; steps up to {max(sink.floors.values(), default=0)} already logged)"
                if sink.resumed
                else ""
            )
        )
        tracker.channels.append(Channel(sink))
    if spec.wandb is not None:
        wb = WandbSink(spec.wandb, config, scratch / "wandb")
        wb.connect(params)
        tracker.wandb = wb  # W&B keeps its own floor: it refuses steps below the run's current one
        tracker.status = tracker.status.model_copy(update={"wandb_run": wb.url})
        log(f"W&B run {wb.url or wb.where}")
        tracker.channels.append(Channel(wb))
    return tracker
