"""`Client`: submit, watch and collect FineTuneJobs from Python, on a cluster or on this machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from kubetune.api.models import Artifacts, FineTuneJob, Progress, StorageSpec
from kubetune.client import jobs, storage
from kubetune.client.errors import ClientError, Forbidden, JobFailed
from kubetune.client.jobs import Events, JobList, JobSource
from kubetune.client.storage import Downloaded, Which

ProgressCallback = Callable[[Progress], Any]


class Backend(Protocol):
    namespace: str

    def submit(self, doc: dict[str, Any]) -> FineTuneJob: ...
    def get(self, name: str) -> FineTuneJob: ...
    def list(self, label_selector: str | None = None, all_namespaces: bool = False) -> JobList: ...
    def watch(
        self,
        name: str | None = None,
        timeout: float | None = None,
        label_selector: str | None = None,
        all_namespaces: bool = False,
    ) -> Iterator[tuple[str, FineTuneJob]]: ...
    def set_suspend(self, name: str, suspend: bool) -> FineTuneJob: ...
    def delete(self, name: str) -> None: ...
    def events(self, name: str) -> Events: ...
    def logs(
        self, name: str, rank: int = 0, follow: bool = True, tail: int | None = None
    ) -> Iterator[str]: ...
    def secret_data(self, name: str) -> dict[str, str]: ...


@dataclass(frozen=True)
class JobArtifacts:
    """Where a job's results are, and a way to fetch them (with the job's own storage settings)."""

    uris: Artifacts
    storage: StorageSpec
    credentials: dict[str, str] | None = None

    def download(self, dest: str | Path, which: Which = "auto") -> Downloaded:
        """Copy the merged model (or, without one, the adapter; or `which`) under `dest`, verified
        against the output's manifest.json. Returns the local directory and files."""
        return storage.download(self.uris, self.storage, dest, which, self.credentials)

    def report(self, dest: str | Path) -> Downloaded:
        """Copy the model card (README.md) and its plots (loss.png, eval.png) into `dest`, verified
        against the output's manifest.json."""
        return storage.fetch_report(self.uris, self.storage, dest, self.credentials)


class Client:
    """The FineTuneJob SDK.

        from kubetune.client import Client
        c = Client()                        # the cluster of your kubeconfig (or Client(backend="local"))
        job = c.submit("examples/quickstart.yaml")
        c.wait(job.metadata.name, on_progress=lambda p: print(p.step, p.loss))
        c.artifacts(job.metadata.name).download("out/")

    backend: "cluster" (kubeconfig/in-cluster; `namespace`, `context`, `kubeconfig` as kubectl
    takes them) or "local" (`kubetune run` on this machine; `workdir`, `nproc`).
    """

    def __init__(
        self,
        backend: Literal["cluster", "local"] | Backend = "cluster",
        *,
        namespace: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        workdir: str | Path | None = None,
        nproc: int | None = None,
    ):
        if backend == "cluster":
            from kubetune.client.cluster import ClusterBackend

            self.backend: Backend = ClusterBackend(
                namespace=namespace, context=context, kubeconfig=kubeconfig
            )
        elif backend == "local":
            from kubetune.client.local import LocalBackend

            self.backend = LocalBackend(workdir=workdir, nproc=nproc)
        elif isinstance(backend, str):
            raise ValueError(f"backend {backend!r}: use 'cluster' or 'local'")
        else:
            self.backend = backend

    @property
    def namespace(self) -> str:
        return self.backend.namespace

    def submit(self, job: JobSource) -> FineTuneJob:
        """Create the job from a FineTuneJob model, a manifest dict or a YAML path.
        Raises SpecInvalid (every problem, with its field) before anything is sent."""
        doc = jobs.checked(job)
        if isinstance(job, str | Path) and hasattr(self.backend, "workdir"):
            return self.backend.submit(doc, base=Path(job).resolve().parent)  # type: ignore[call-arg]
        return self.backend.submit(doc)

    def get(self, name: str) -> FineTuneJob:
        return self.backend.get(name)

    def list(
        self,
        phase: str | Iterable[str] | None = None,
        label_selector: str | None = None,
        all_namespaces: bool = False,
    ) -> JobList:
        """Jobs in the namespace (every namespace with `all_namespaces`); `label_selector` as kubectl's -l;
        `phase` keeps only those in that phase (or phases)."""
        items = self.backend.list(label_selector, all_namespaces)
        if phase is None:
            return items
        wanted = jobs.phases(phase)
        return [j for j in items if jobs.phase_of(j) in wanted]

    def watch(
        self,
        name: str | None = None,
        timeout: float | None = None,
        label_selector: str | None = None,
        all_namespaces: bool = False,
    ) -> Iterator[tuple[str, FineTuneJob]]:
        """(event, job) now and on every change (a Kubernetes watch on the cluster backend)."""
        if label_selector or all_namespaces:
            return self.backend.watch(name, timeout, label_selector, all_namespaces)
        return self.backend.watch(name, timeout)

    def stream_progress(self, name: str, timeout: float | None = None) -> Iterator[Progress]:
        """Each new rank-0 progress reading of the job, until it succeeds or fails."""
        last: Progress | None = None
        for event, job in self.watch(name, timeout):
            if event == "DELETED":
                return
            current = jobs.progress_of(job)
            if jobs.new_progress(last, current):
                assert current is not None
                last = current
                yield current
            if jobs.is_finished(job):
                return

    def wait(
        self,
        name: str,
        until: str | Iterable[str] = "Succeeded",
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        on_phase: Callable[[str], Any] | None = None,
    ) -> FineTuneJob:
        """Block until the job is in `until`; call `on_progress` with each new progress reading.
        Raises JobFailed when it finishes in another phase, TimeoutError after `timeout` seconds."""
        wanted = jobs.phases(until)
        started = time.monotonic()
        last: Progress | None = None
        phase = None
        for event, job in self.watch(name, timeout):
            if event == "DELETED":
                raise JobFailed(name, "Deleted", None, "the FineTuneJob was deleted while waiting")
            if on_phase and jobs.phase_of(job) != phase:
                on_phase(jobs.phase_of(job))
            phase = jobs.phase_of(job)
            current = jobs.progress_of(job)
            if on_progress and jobs.new_progress(last, current):
                assert current is not None
                on_progress(current)
            last = current or last
            if phase in wanted:
                return job
            if jobs.is_finished(job):
                failure = job.status.last_failure if job.status else None
                raise JobFailed(
                    name,
                    phase,
                    failure.reason if failure else None,
                    (failure.message if failure else None) or (job.status.message if job.status else None),
                )
        raise TimeoutError(
            f"FineTuneJob {name} not {'/'.join(sorted(wanted))} after {time.monotonic() - started:.0f}s "
            f"(phase {phase})"
        )

    def logs(self, name: str, rank: int = 0, follow: bool = True, tail: int | None = None) -> Iterator[str]:
        """Lines of the trainer container of node rank `rank` in the current gang (the kubelet's log, as
        `kubectl logs` reads it). `follow`: waits for the pod and its container to start, then yields
        lines as they are written, and ends when the container ends."""
        return self.backend.logs(name, rank=rank, follow=follow, tail=tail)

    def suspend(self, name: str) -> FineTuneJob:
        """Stop the pods (they checkpoint first); resume() continues from that checkpoint."""
        return self.backend.set_suspend(name, True)

    def resume(self, name: str) -> FineTuneJob:
        return self.backend.set_suspend(name, False)

    def delete(self, name: str) -> None:
        """Delete the job; its ConfigMap, Service, Job and pods go with it (owner references)."""
        self.backend.delete(name)

    def events(self, name: str) -> Events:
        return self.backend.events(name)

    def artifacts(self, name: str, use_job_secret: bool = True, endpoint: str | None = None) -> JobArtifacts:
        """The job's artifact URIs; `.download(dest)` fetches the merged model or adapter.
        S3 credentials: the job's spec.storage.secretRef Secret when readable (use_job_secret),
        else this machine's (AWS_* env, ~/.aws, instance role). `endpoint`: the S3 endpoint as this
        machine reaches it, when the job's spec.storage.endpoint is an in-cluster address."""
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise storage.DownloadError(f"S3 endpoint {endpoint!r}: give a URL, e.g. http://localhost:9000")
        job = self.get(name)
        credentials = None
        ref = job.spec.storage.secret_ref
        if use_job_secret and ref is not None:
            try:
                data = self.backend.secret_data(ref.name)
            except (Forbidden, ClientError):
                data = {}
            if data.get(ref.access_key_id_key):
                credentials = {
                    "AWS_ACCESS_KEY_ID": data[ref.access_key_id_key],
                    "AWS_SECRET_ACCESS_KEY": data.get(ref.secret_access_key_key, ""),
                }
                if ref.session_token_key and data.get(ref.session_token_key):
                    credentials["AWS_SESSION_TOKEN"] = data[ref.session_token_key]
        where = (
            job.spec.storage
            if endpoint is None
            else job.spec.storage.model_copy(update={"endpoint": endpoint})
        )
        return JobArtifacts(uris=jobs.artifacts_of(job), storage=where, credentials=credentials)

    def download(
        self, name: str, dest: str | Path, which: Which = "auto", endpoint: str | None = None
    ) -> Downloaded:
        return self.artifacts(name, endpoint=endpoint).download(dest, which)

    def report(self, name: str, dest: str | Path, endpoint: str | None = None) -> Downloaded:
        """The job's model card and plots, saved under `dest` (`Downloaded.path / "README.md"`)."""
        return self.artifacts(name, endpoint=endpoint).report(dest)
