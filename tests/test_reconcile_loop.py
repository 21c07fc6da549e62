"""The watch-driven reconcile loop's parts: the Store fed by watch events, the work queue, what one pass
observes, when it looks again, the progress budget, the client's QPS limit and retry, the settings."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import kopf
import pytest
from kubernetes.client.rest import ApiException
from kubetune.api.models import FineTuneJobStatus, Progress
from kubetune.controller import kube
from kubetune.controller.cluster import ApiMissing
from kubetune.controller.loop import progress_interval
from kubetune.controller.reconcile import observe, status_changed, wake_after
from kubetune.controller.settings import Settings
from kubetune.controller.store import Store, WorkQueue
from kubetune.status.derive import Observed
from operator_samples import spec as sample_spec
from pydantic import ValidationError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def ftj(name: str = "demo", rv: str = "1", **status: object) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": "u1", "resourceVersion": rv},
        "status": dict(status),
    }


def pod(
    name: str, restart: int = 0, index: str = "0", phase: str = "Running", ip: str = "10.0.0.1", rv: str = "1"
) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": name, "resourceVersion": rv,
                     "labels": {"kubetune.io/job-name": "demo", "kubetune.io/restart": str(restart)},
                     "annotations": {"batch.kubernetes.io/job-completion-index": index}},
        "status": {"phase": phase, "podIP": ip},
    }  # fmt: skip


def job(name: str, rv: str = "1", deleting: bool = False) -> dict:
    meta = {
        "name": name,
        "namespace": "ml",
        "uid": name,
        "resourceVersion": rv,
        "labels": {"kubetune.io/job-name": "demo"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {}, "status": {}}


# ------------------------------------------------------------------ Store


def test_store_keeps_our_own_newer_status_write_over_an_older_watch_event():
    store = Store()
    store.put_ftj(ftj(rv="7", phase="Running", restarts=1))  # the response of our status patch
    store.put_ftj(ftj(rv="6", phase="Running", restarts=0))  # the watch catching up
    assert store.ftj(("ml", "demo"))["status"]["restarts"] == 1


def test_the_watch_echoing_our_own_write_is_nothing_new():
    """A write's response goes into the store; its watch event (same resourceVersion) queues no second pass."""
    store = Store()
    assert store.put_ftj(ftj(rv="7", phase="Running")) is True  # our status patch's response
    assert store.put_ftj(ftj(rv="7", phase="Running")) is False  # its echo
    assert store.put_ftj(ftj(rv="8", phase="Succeeded")) is True  # someone else's change
    assert store.put_child("Job", job("demo-r0", rv="3")) == ("ml", "demo")  # our create's response
    assert store.put_child("Job", job("demo-r0", rv="3")) is None  # its ADDED event
    assert store.put_child("Job", job("demo-r0", rv="4")) == (
        "ml",
        "demo",
    )  # the Job controller's status update


def test_store_files_children_under_their_owner_label_and_forgets_deleted_ones():
    store = Store()
    assert store.put_child("Job", job("demo-r0")) == ("ml", "demo")
    store.put_child("Pod", pod("demo-r0-0"))
    assert store.put_child("Pod", {"metadata": {"name": "x", "namespace": "ml", "labels": {}}}) is None
    jobs, pods = store.children(("ml", "demo"))
    assert [j["metadata"]["name"] for j in jobs] == ["demo-r0"] and len(pods) == 1
    store.drop_child("Job", job("demo-r0"))
    assert store.children(("ml", "demo"))[0] == []


def test_progress_targets_are_running_rank0_pods_of_the_current_gang_of_unfinished_jobs():
    store = Store()
    store.put_ftj(ftj(phase="Running", restarts=1))
    store.put_child("Pod", pod("demo-r0-0", restart=0, ip="10.0.0.1"))  # previous gang
    store.put_child("Pod", pod("demo-r1-0", restart=1, ip="10.0.0.2"))
    store.put_child("Pod", pod("demo-r1-1", restart=1, index="1", ip="10.0.0.3"))  # not rank 0
    assert store.progress_targets() == [(("ml", "demo"), "demo-r1-0", "10.0.0.2")]
    store.put_ftj(ftj(rv="2", phase="Succeeded", restarts=1))
    assert store.progress_targets() == []


def test_a_progress_read_queues_the_job_only_when_it_says_something_new():
    store = Store()
    key = ("ml", "demo")
    assert store.put_progress(key, "p0", Progress(step=3, updated_at="t1"), 1.0)
    assert not store.put_progress(key, "p0", Progress(step=3, updated_at="t2"), 2.0)
    assert store.put_progress(key, "p0", Progress(step=4, updated_at="t3"), 3.0)
    assert store.seen_progress(key).step_moved_at == 3.0


# ------------------------------------------------------------------ WorkQueue


def test_work_queue_holds_a_key_once_and_requeues_a_key_changed_while_it_was_being_worked():
    async def scenario() -> list:
        q = WorkQueue()
        q.add(("ml", "a"))
        q.add(("ml", "a"))
        q.add(("ml", "b"))
        assert len(q) == 2
        first = await q.get()
        q.add(first)  # changed while a worker has it: not handed to a second worker
        second = await q.get()
        assert second == ("ml", "b") and len(q) == 0
        q.done(first)  # ...but queued again once the first pass is done
        third = await asyncio.wait_for(q.get(), 1)
        return [first, second, third]

    assert asyncio.run(scenario()) == [("ml", "a"), ("ml", "b"), ("ml", "a")]


def test_work_queue_delayed_add_keeps_the_earliest_wake_up():
    async def scenario() -> float:
        q = WorkQueue()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        q.add_after(("ml", "a"), 5.0)
        q.add_after(("ml", "a"), 0.05)
        q.add_after(("ml", "a"), 3.0)
        await asyncio.wait_for(q.get(), 2)
        return loop.time() - t0

    assert asyncio.run(scenario()) < 1.0


# ------------------------------------------------------------------ one pass


def test_observe_shows_only_the_current_gang_and_counts_what_is_left_of_older_ones():
    jobs = [job("demo-r0", deleting=True), job("demo-r1")]
    pods = [pod("demo-r0-0", restart=0), pod("demo-r1-0", restart=1)]
    seen = observe("demo", 1, jobs, pods, ("demo-r1-0", Progress(step=5)))
    assert seen.job["metadata"]["name"] == "demo-r1" and [p["metadata"]["name"] for p in seen.pods] == [
        "demo-r1-0"
    ]
    assert seen.stale == 2 and seen.progress.step == 5


def test_observe_ignores_progress_read_from_the_previous_gangs_rank0():
    seen = observe(
        "demo", 1, [job("demo-r1")], [pod("demo-r1-0", restart=1)], ("demo-r0-0", Progress(step=50))
    )
    assert seen.progress is None


def test_a_job_being_deleted_is_not_the_current_workload():
    seen = observe("demo", 0, [job("demo-r0", deleting=True)], [], None)
    assert seen.job is None and seen.stale == 1


def test_pods_of_an_earlier_job_with_the_same_name_are_stale():
    """A new run reuses NAME-r0: the Job controller's uid label tells its pods from the last run's."""
    old_pod = pod("demo-r0-0-aaaaa")
    old_pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = "old-uid"
    new_pod = pod("demo-r0-0-bbbbb")
    new_pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = (
        "demo-r0"  # job() uses the name as uid
    )
    seen = observe("demo", 0, [job("demo-r0")], [old_pod, new_pod], None)
    assert [p["metadata"]["name"] for p in seen.pods] == ["demo-r0-0-bbbbb"] and seen.stale == 1


def test_without_a_current_job_every_pod_is_stale():
    seen = observe("demo", 0, [], [pod("demo-r0-0")], None)
    assert seen.job is None and seen.pods == [] and seen.stale == 1


def test_wake_after_a_running_job_only_for_its_deadline():
    spec = sample_spec(runPolicy={"activeDeadlineSeconds": 100})
    status = FineTuneJobStatus(phase="Running", start_time="2026-01-01T00:00:00Z")
    assert wake_after(
        spec, status, Observed(job=None, progress=Progress(step=1)), T0 + timedelta(seconds=40), 10
    ) == pytest.approx(60.5)
    assert wake_after(sample_spec(), status, Observed(job=None, progress=Progress(step=1)), T0, 10) is None


def test_wake_after_a_finished_job_when_its_ttl_runs_out():
    spec = sample_spec(runPolicy={"ttlSecondsAfterFinished": 30})
    status = FineTuneJobStatus(phase="Succeeded", completion_time="2026-01-01T00:00:00Z")
    assert wake_after(spec, status, Observed(job=None), T0 + timedelta(seconds=10), 10) == pytest.approx(20)


def test_wake_after_an_initializing_job_whose_trainer_has_not_answered():
    spec = sample_spec()
    assert wake_after(spec, FineTuneJobStatus(phase="Initializing"), Observed(job=None), T0, 10) == 10


def test_status_unchanged_means_no_write():
    assert not status_changed({"phase": "Running", "kopf": {"x": 1}}, {"phase": "Running"})
    assert status_changed({"phase": "Running"}, {"phase": "Running", "progress": {"step": 2}})


# ------------------------------------------------------------------ budget, QPS, retry


def test_progress_interval_stretches_with_the_fleet_to_keep_a_fixed_budget():
    assert progress_interval(10, 10.0, 100.0) == 10.0
    assert progress_interval(1000, 10.0, 100.0) == 10.0
    assert progress_interval(5000, 10.0, 100.0) == 50.0


def test_token_bucket_allows_a_burst_then_paces_at_qps():
    now = [0.0]
    slept: list[float] = []
    bucket = kube.TokenBucket(qps=10, burst=3, clock=lambda: now[0], sleep=slept.append)
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() == pytest.approx(0.1)
    assert bucket.reserve() == pytest.approx(0.2)
    now[0] = 10.0  # refilled, but never above the burst
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0] and bucket.reserve() > 0


def test_call_retries_429_and_5xx_with_backoff_then_succeeds():
    answers = [ApiException(status=429), ApiException(status=503), "ok"]
    waits: list[float] = []

    def flaky() -> str:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert kube.KubeClient().call(flaky, sleep=waits.append) == "ok"
    assert len(waits) == 2 and all(0 <= w <= 8 for w in waits)


def test_call_does_not_retry_a_refusal_and_gives_up_after_its_attempts():
    def refused() -> None:
        raise ApiException(status=422)

    with pytest.raises(ApiException):
        kube.KubeClient().call(refused, sleep=lambda s: None)
    tries = []

    def down() -> None:
        tries.append(1)
        raise ApiException(status=500)

    with pytest.raises(ApiException):
        kube.KubeClient().call(down, attempts=3, sleep=lambda s: None)
    assert len(tries) == 3


def test_retry_after_header_is_honoured():
    exc = ApiException(status=429)
    exc.headers = {"Retry-After": "2"}
    assert kube.retry_after(exc) == 2.0


# ------------------------------------------------------------------ settings


def test_settings_come_from_the_environment_and_given_values_win(monkeypatch):
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("KUBETUNE_POLL_INTERVAL", "3")
    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "JSON")
    s = Settings()
    assert s.namespaces == ["team-a", "team-b"] and s.poll_interval == 3.0 and s.log_format == "json"
    assert Settings(poll_interval=1.5, namespaces=["x"]).poll_interval == 1.5


def test_a_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("KUBETUNE_POLL_INTERVAL", "soon")
    with pytest.raises(ValidationError, match="poll_interval"):
        Settings()


# ------------------------------------------------------------------ Events and connections


def test_events_are_queued_and_posted_in_order_by_one_thread_without_waiting():
    import threading

    gate, started, posted = threading.Event(), threading.Event(), []

    def slow_post(event: dict) -> None:
        started.set()
        gate.wait(5)
        posted.append(event["reason"])

    recorder = kube.EventRecorder(post=slow_post, maxlen=3)
    body = {"metadata": {"name": "demo", "namespace": "ml", "uid": "u1"}}
    recorder.record(kube.event_for(body, "Normal", "Created", "m"))
    assert started.wait(5)
    for reason in ("Suspended", "Resumed", "Running", "Succeeded"):
        recorder.record(
            kube.event_for(body, "Normal", reason, "m")
        )  # returns while the first post still waits
    assert posted == [] and not recorder.flush(0.1)
    gate.set()
    assert recorder.flush(5)
    # "Created" was being posted; of the four queued behind it the oldest went when the fifth came (maxlen 3)
    assert posted == ["Created", "Resumed", "Running", "Succeeded"] and recorder.dropped == 1


class ApiServer:
    """A local HTTP server answering every request with one status and a JSON body: enough of an API server to
    see what KubeClient makes of each answer and how many connections it opens."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.peers: set[int] = set()
        self.status = 201
        self.body: dict = {"kind": "Status", "metadata": {}}
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                outer.peers.add(self.client_address[1])
                outer.requests.append((self.command, self.path))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps(outer.body).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self) -> kube.KubeClient:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return kube.KubeClient(api=client.ApiClient(cfg))


@pytest.fixture
def api_server():
    server = ApiServer()
    yield server
    server.server.shutdown()


def test_calls_whose_answer_is_not_read_still_give_their_connection_back(api_server):
    """One keep-alive connection for many calls: an unread answer used to keep its connection out of the pool,
    so each Event cost the next call a new connection (a TLS handshake against a real API server)."""
    cluster = api_server.client()
    body = {"metadata": {"name": "demo", "namespace": "ml", "uid": "u1"}}
    for i in range(5):
        cluster.create_event(kube.event_for(body, "Normal", "Created", str(i)))
        cluster.patch_config_map("ml", "demo-config", {"data": {"k": str(i)}})
        cluster.delete_finetunejob("ml", "demo")
    assert len(api_server.peers) == 1, api_server.peers
    assert cluster.calls == 15


JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "demo-r0", "namespace": "ml"},
    "spec": {},
}
ISVC = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "demo", "namespace": "ml"},
}


@pytest.mark.parametrize(
    ("status", "call", "outcome"),
    [
        (201, lambda c: c.create_if_absent(JOB), {"kind": "Job"}),
        (
            409,
            lambda c: c.create_if_absent(JOB),
            None,
        ),  # already there: a restarted operator duplicates nothing
        (
            422,
            lambda c: c.create_if_absent(JOB),
            kopf.PermanentError("create Job demo-r0 refused by the API server"),
        ),
        (404, lambda c: c.create_if_absent(JOB), kopf.TemporaryError("create Job demo-r0: 404")),
        (404, lambda c: c.create_if_absent(ISVC), ApiMissing("serving.kserve.io/v1beta1")),
        (404, lambda c: c.patch_status("ml", "demo", {}), None),  # deleted meanwhile
        (404, lambda c: c.patch_job("ml", "demo-r0", {}), None),
        (404, lambda c: c.delete_job("ml", "demo-r0"), None),
        (404, lambda c: c.read_serving(ISVC), None),
        (
            404,
            lambda c: c.patch_config_map("ml", "demo-config", {}),
            kopf.TemporaryError("patch ConfigMap demo-config: 404"),
        ),
        (403, lambda c: c.patch_status("ml", "demo", {}), kopf.TemporaryError("patch status of demo: 403")),
        (
            422,
            lambda c: c.replace_serving(ISVC),
            kopf.PermanentError("replace InferenceService demo refused"),
        ),
        (500, lambda c: c.create_event({"metadata": {"namespace": "ml"}}), None),  # best effort: never raises
    ],
    ids=lambda v: str(v) if isinstance(v, int) else None,
)
def test_each_api_answer_becomes_one_outcome_of_the_interface(api_server, status, call, outcome, monkeypatch):
    monkeypatch.setattr(kube, "backoff", lambda attempt: 0.0)  # a 500 is retried: no waiting here
    api_server.status = status
    api_server.body = (
        {"kind": "Job", "metadata": {"name": "demo-r0"}}
        if status == 201
        else {"kind": "Status", "code": status}
    )
    cluster = api_server.client()
    if isinstance(outcome, Exception):
        with pytest.raises(type(outcome), match=str(outcome)):
            call(cluster)
    elif outcome is None:
        assert call(cluster) is None
    else:
        assert call(cluster)["kind"] == outcome["kind"]
