"""The local backend: the same FineTuneJob run on this machine by `kubetune run` (torchrun, no cluster).

A notebook switches from laptop to cluster by one argument (`Client(backend="local")` vs
`Client()`); the calls and the returned FineTuneJob objects are the same. The status is
derived here from the `kubetune run` process and rank 0's /progress endpoint:
Initializing until the trainer reports, Running, then Succeeded or Failed (exit code).
Suspend sends SIGTERM (the trainer checkpoints); resume runs it again from that checkpoint.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.contract import REASONS, RUN_CONFIG_FILE, RUN_TERMINATION_FILE, TerminationMessage
from kubetune.api.models import FineTuneJob, FineTuneJobStatus, Progress
from kubetune.api.trainer_config import TrainerConfig
from kubetune.api.uris import map_uris, resolve_uri
from kubetune.client import jobs
from kubetune.client.errors import AlreadyExists, NotFound
from kubetune.client.jobs import Events, JobList
from kubetune.status.derive import artifacts
from kubetune.status.progress import fetch_progress, to_progress


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths made absolute against `base` (the YAML file's directory, or the working directory)."""
    doc = copy.deepcopy(doc)
    map_uris(doc["spec"], lambda uri: resolve_uri(uri, base))
    return doc


@dataclass
class LocalRun:
    doc: dict[str, Any]
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    created: str = field(default_factory=now_iso)
    started: str | None = None
    finished: str | None = None
    phase: str = "Pending"
    progress: Progress | None = None
    port: int | None = None
    failure: tuple[int, str, str] | None = None
    restarts: int = 0

    @property
    def log(self) -> Path:
        return self.dir / "run.log"

    @property
    def work(self) -> Path:
        """`kubetune run --work-dir`: its trainer config (the progress port) and the trainer's TerminationMessage."""
        return self.dir / "work"


class LocalBackend:
    def __init__(self, workdir: str | Path | None = None, nproc: int | None = None, namespace: str = "local"):
        self.workdir = Path(workdir or Path.cwd() / "runs" / ".kubetune-local")
        self.nproc = nproc
        self.namespace = namespace
        self.runs: dict[str, LocalRun] = {}

    # ---------------------------------------------------------------- processes

    def _start(self, run: LocalRun) -> None:
        manifest = run.dir / "manifest.yaml"
        doc = copy.deepcopy(run.doc)
        doc["spec"].setdefault("runPolicy", {})["suspend"] = False
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        cmd = [
            sys.executable,
            "-m",
            "kubetune.cli.main",
            "run",
            str(manifest),
            "--verbose",
            "--work-dir",
            str(run.work),
        ]
        (run.work / RUN_CONFIG_FILE).unlink(
            missing_ok=True
        )  # the last start's config names the last start's port
        if self.nproc:
            cmd += ["--nproc", str(self.nproc)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with run.log.open("ab") as out:
            run.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        run.port, run.phase, run.failure = None, "Initializing", None
        run.started = run.started or now_iso()

    def _refresh(self, run: LocalRun) -> None:
        if run.proc is None:
            return
        if run.port is None and (config := run.work / RUN_CONFIG_FILE).exists():
            try:
                run.port = TrainerConfig.load(config).progress_port
            except (ValueError, OSError):  # being written
                pass
        code = run.proc.poll()
        if code is None:
            data = fetch_progress("127.0.0.1", run.port, timeout=0.5) if run.port else None
            if data is not None:
                run.progress = to_progress(data, now_iso())
                run.phase = "Running"
            return
        run.proc = None
        run.finished = now_iso()
        if run.phase == "Suspended":
            return
        if code == 0:
            run.phase = "Succeeded"
            return
        run.phase = "Failed"
        told = TerminationMessage.read(run.work / RUN_TERMINATION_FILE)
        if told is not None:
            run.failure = (told.exit_code, told.reason, told.message)
        else:  # no trainer got as far as its message (refused manifest, a rank killed): kubetune run's exit code
            run.failure = (code, REASONS.get(code, "Error"), f"see {run.log}")

    def _run(self, name: str) -> LocalRun:
        run = self.runs.get(name)
        if run is None:
            raise NotFound("finetunejob", name, self.namespace)
        self._refresh(run)
        return run

    def _job(self, run: LocalRun) -> FineTuneJob:
        spec = jobs.from_object({**run.doc, "status": None}).spec
        status: dict[str, Any] = {
            "phase": run.phase,
            "startTime": run.started,
            "restarts": run.restarts,
            "progress": run.progress.to_wire() if run.progress else None,
        }
        if run.phase == "Succeeded":
            status["completionTime"] = run.finished
            status["artifacts"] = artifacts(spec).to_wire()
        if run.failure:
            code, reason, message = run.failure
            status["completionTime"] = run.finished
            status["lastFailure"] = {"pod": "local", "exitCode": code, "reason": reason, "message": message}
            status["message"] = f"{reason}: {message}"
        meta = {**run.doc["metadata"], "namespace": self.namespace, "creationTimestamp": run.created}
        return FineTuneJob.model_validate(
            {
                **run.doc,
                "metadata": meta,
                "status": FineTuneJobStatus.model_validate(
                    {k: v for k, v in status.items() if v is not None}
                ),
            }
        )

    # ---------------------------------------------------------------- the API

    def submit(self, doc: dict[str, Any], base: Path | None = None) -> FineTuneJob:
        name = doc["metadata"]["name"]
        if name in self.runs and self.runs[name].proc is not None:
            raise AlreadyExists("finetunejob", name, self.namespace)
        doc = resolve_paths(doc, base or Path.cwd())
        rundir = self.workdir / name
        rundir.mkdir(parents=True, exist_ok=True)
        run = LocalRun(doc=doc, dir=rundir)
        self.runs[name] = run
        if (doc["spec"].get("runPolicy") or {}).get("suspend"):
            run.phase = "Suspended"
        else:
            self._start(run)
        return self._job(run)

    def get(self, name: str) -> FineTuneJob:
        return self._job(self._run(name))

    def list(self, label_selector: str | None = None, all_namespaces: bool = False) -> JobList:
        # One machine, one namespace; label selectors are the cluster backend's.
        return [self.get(n) for n in self.runs]

    def watch(
        self,
        name: str | None = None,
        timeout: float | None = None,
        label_selector: str | None = None,
        all_namespaces: bool = False,
    ) -> Iterator[tuple[str, FineTuneJob]]:
        """Local processes have no API server to watch: the state is looked at twice a second."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: dict[str, str] = {}
        while True:
            for n in [name] if name else list(self.runs):
                job = self.get(n)
                key = job.model_dump_json(exclude={"status": {"progress": {"updated_at"}}})
                if seen.get(n) != key:
                    yield ("ADDED" if n not in seen else "MODIFIED"), job
                    seen[n] = key
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def set_suspend(self, name: str, suspend: bool) -> FineTuneJob:
        run = self._run(name)
        if suspend and run.proc is not None:
            run.phase = "Suspended"
            os.killpg(run.proc.pid, signal.SIGTERM)  # the trainer checkpoints on SIGTERM
            run.proc.wait()
            run.proc = None
        elif not suspend and run.phase == "Suspended":
            self._start(run)
        return self._job(run)

    def delete(self, name: str) -> None:
        run = self._run(name)
        if run.proc is not None:
            os.killpg(run.proc.pid, signal.SIGTERM)
            run.proc.wait()
        del self.runs[name]

    def events(self, name: str) -> Events:
        self._run(name)
        return []

    def logs(self, name: str, rank: int = 0, follow: bool = True, tail: int | None = None) -> Iterator[str]:
        """The `kubetune run` log: all local ranks write to it (there is one log, not one per rank)."""
        run = self._run(name)
        with run.log.open(errors="replace") as f:
            lines = f.readlines()
            yield from (ln.rstrip("\n") for ln in (lines[-tail:] if tail else lines))
            while follow:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                self._refresh(run)
                if run.proc is None:
                    yield from (ln.rstrip("\n") for ln in f.readlines())
                    return
                time.sleep(0.2)

    def secret_data(self, name: str) -> dict[str, str]:
        return {}  # credentials for a local run come from this machine's environment
