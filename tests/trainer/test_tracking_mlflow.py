"""spec.tracking.mlflow against a real MLflow tracking server (pip-installed `mlflow server`, SQLite backend,
artifacts proxied into moto's S3 server), read back through MLflow's own client. Real torchrun training.

The trainer's side of what e2e/suite/test_mlflow.py does not cover: a gang killed after logging past its
checkpoint continues the same run with each step once (and registers the unpublished model by its S3 URI
once the job ends); a server that goes away mid-run; an unreachable server. The job through the operator
(metrics read back equal metrics.json, the run's URL in status, the version pointing at the published OCI
artifact, refused credentials from the Secret against MLflow's basic-auth app) is e2e/suite/test_mlflow.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.contract import ExitCode
from kubetune.api.models import StorageSpec
from kubetune_trainer import storage
from mlflow_server import MlflowServer
from trainer_helpers import job_spec, kill_run, launch, refused_url, run_trainer, termination, write_config

pytestmark = pytest.mark.slow
EXPERIMENT = "kubetune-tests"


@pytest.fixture(scope="module")
def s3_endpoint(s3_endpoint: str) -> str:
    """conftest's S3 server, with the bucket the jobs write to."""
    storage.s3_client(StorageSpec(endpoint=s3_endpoint)).create_bucket(Bucket="out")
    return s3_endpoint


@pytest.fixture(scope="module")
def mlflow(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_endpoint) as server:
        yield server


def client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def tracked_spec(tmp: Path, s3_endpoint: str, uri: str, prefix: str, **tracking: Any) -> dict[str, Any]:
    return job_spec(tmp, **{"training.maxSteps": 20, "training.loggingSteps": 2, "training.evalSteps": 10,
                            "output.uri": f"s3://out/{prefix}", "output.checkpointSteps": 10,
                            "storage.endpoint": s3_endpoint, "tracking.mlflow": {"uri": uri, "experiment": EXPERIMENT, **tracking}})  # fmt: skip


def read_json(s3_endpoint: str, key: str) -> dict[str, Any]:
    body = (
        storage.s3_client(StorageSpec(endpoint=s3_endpoint)).get_object(Bucket="out", Key=key)["Body"].read()
    )
    return json.loads(body)


def runs_of(server: MlflowServer, prefix: str) -> list[Any]:
    c = client(server)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`kubetune.output` = 's3://out/{prefix}'"
    )


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(server).get_metric_history(run_id, key))


def test_a_restarted_gang_continues_the_same_run_without_duplicate_steps(
    tmp_path: Path, s3_endpoint: str, mlflow: MlflowServer
) -> None:
    spec = tracked_spec(
        tmp_path, s3_endpoint, mlflow.uri, "restarted", registerAs="tiny-digits", runName="first"
    )
    spec["distributed"]["procsPerNode"] = 1
    config = write_config(tmp_path, spec)
    # gang 1: logs steps 2..14, checkpoints at 10, then rank 0 stops stepping at 16 and the gang is killed
    proc = launch(tmp_path, config, 1, {"KUBETUNE_DEBUG_HANG_AT_STEP": "16"}, start_new_session=True)
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 300
    while "step 14/20" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "step 14/20" in seen, seen[-3000:]
    [run] = runs_of(mlflow, "restarted")
    for _ in range(60):  # the worker sends in the background
        if history(mlflow, run.info.run_id, "loss")[-1:] == [
            (14, history(mlflow, run.info.run_id, "loss")[-1][1])
        ]:
            break
        time.sleep(0.5)
    before = history(mlflow, run.info.run_id, "loss")
    assert [s for s, _ in before] == [2, 4, 6, 8, 10, 12, 14]
    kill_run(proc, tmp_path)
    # gang 2 resumes from step 10 and re-trains 11..14: the run goes on, steps 12 and 14 are not logged again
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == 0, out[-4000:]
    assert "resumed from checkpoint step 10" in out and "(continued; steps up to 14 already logged)" in out
    [again] = runs_of(mlflow, "restarted")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    after = history(mlflow, run.info.run_id, "loss")
    assert [s for s, _ in after] == list(range(2, 21, 2))  # each step once
    assert after[:7] == before  # the first gang's points kept
    metrics = read_json(s3_endpoint, "restarted/metrics.json")
    assert [(p["step"], p["loss"]) for p in metrics["lossCurve"] if p["step"] > 14] == after[7:]
    assert again.info.run_name == "first" and again.data.params["training.learningRate"] == "0.005"
    assert history(mlflow, run.info.run_id, "evalLoss")[-1] == (20, metrics["evalLossAfter"])
    # registered once, at the end of the last gang: the unpublished model's S3 URI, with the run
    [version] = client(mlflow).search_model_versions("name = 'tiny-digits'")
    assert version.source == "s3://out/restarted/model/" and version.run_id == run.info.run_id
    report = termination(tmp_path)["progress"]["tracking"]
    assert (
        report["mlflowModelVersion"] == f"tiny-digits/{version.version}"
        and report["mlflowRunId"] == run.info.run_id
    )
    assert {"README.md", "loss.png", "metrics.json"} <= {
        f.path for f in client(mlflow).list_artifacts(run.info.run_id)
    }
    card = (
        storage.s3_client(StorageSpec(endpoint=s3_endpoint))
        .get_object(Bucket="out", Key="restarted/README.md")["Body"]
        .read()
    )
    assert report["mlflowRun"].encode() in card


class Proxy:
    """A TCP forwarder in front of the server: closing it is the server going away, as the trainer sees it."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """New connections are refused, and the open ones (a client's keep-alive pool) are cut."""
        self.open = False
        try:
            self.sock.shutdown(
                socket.SHUT_RDWR
            )  # stops listening and wakes accept() (close alone does neither on Linux)
        except OSError:
            pass
        self.sock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_a_server_that_goes_away_mid_run_neither_fails_nor_stalls_training(
    tmp_path: Path, s3_endpoint: str, mlflow: MlflowServer
) -> None:
    proxy = Proxy(mlflow.port)
    spec = tracked_spec(
        tmp_path, s3_endpoint, f"http://127.0.0.1:{proxy.port}", "server-gone", registerAs="never-registered"
    )
    spec["training"]["maxSteps"] = 40
    spec["distributed"]["procsPerNode"] = 1
    proc = launch(tmp_path, write_config(tmp_path, spec), 1, start_new_session=True)
    assert proc.stdout is not None
    out = ""
    for line in proc.stdout:
        out += line
        if "step 4/40" in line:
            proxy.close()  # connections refused from here on
    code = proc.wait(timeout=600)
    assert code == 0, out[-4000:]
    assert out.count("is not taking metrics") == 1, out[-4000:]  # warned once
    metrics = read_json(s3_endpoint, "server-gone/metrics.json")
    delivery = metrics["tracking"]["delivery"]["MLflow"]
    # every point after the cut is counted as undelivered: failed once its retries are spent, queued while a send
    # is still retrying when the run ends (which of the two depends on timing)
    assert delivery["sent"] > 0 and delivery["failed"] + delivery["queued"] > 0, delivery
    assert "registered MLflow model version" not in out
    assert termination(tmp_path)["exitCode"] == ExitCode.OK


def test_an_unreachable_server_fails_the_job_before_training(tmp_path: Path, s3_endpoint: str) -> None:
    with refused_url() as uri:
        spec = tracked_spec(tmp_path, s3_endpoint, uri, "unreachable")
        started = time.monotonic()
        code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == ExitCode.INFRASTRUCTURE, out[-3000:]
    message = termination(tmp_path)["message"]
    assert uri in message and "\n" not in message
    assert "step 1/" not in out and time.monotonic() - started < 180
    assert "Contents" not in storage.s3_client(StorageSpec(endpoint=s3_endpoint)).list_objects_v2(
        Bucket="out", Prefix="unreachable/checkpoints"
    )
