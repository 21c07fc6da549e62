"""The SDK's pure parts: typed errors from API answers, reading jobs, waiting, the get table, downloads."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.models import Artifacts, FineTuneJob, StorageSpec
from kubetune.cli.describe import describe
from kubetune.cli.table import bar, row
from kubetune.client import (
    AlreadyExists,
    Client,
    DownloadError,
    Forbidden,
    JobFailed,
    NotFound,
    SpecInvalid,
    storage,
)
from kubetune.client.errors import from_api
from kubetune.client.jobs import checked, from_object, new_progress
from operator_samples import manifest

ROOT = Path(__file__).resolve().parents[1]

# What kube-apiserver answers when RBAC refuses a create.
FORBIDDEN = {
    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
    "message": 'finetunejobs.kubetune.io is forbidden: User "system:serviceaccount:ml:nb" cannot create resource '
               '"finetunejobs" in API group "kubetune.io" in the namespace "ml"',
    "details": {"group": "kubetune.io", "kind": "finetunejobs"},
}  # fmt: skip


def test_forbidden_names_the_missing_verb_and_resource() -> None:
    err = from_api(
        403,
        json.dumps(FORBIDDEN).encode(),
        verb="create",
        resource="finetunejobs.kubetune.io",
        name="x",
        namespace="ml",
    )
    assert isinstance(err, Forbidden)
    assert (err.verb, err.resource, err.user) == (
        "create",
        "finetunejobs.kubetune.io",
        "system:serviceaccount:ml:nb",
    )
    assert "verb 'create' on finetunejobs.kubetune.io" in str(err)


def test_forbidden_for_pod_logs_names_the_subresource() -> None:
    body = {
        "message": 'pods "j-r0-0" is forbidden: User "alice" cannot get resource "pods/log" in API group "" in the namespace "ml"'
    }
    err = from_api(403, body, verb="get", resource="pods/log", name="j-r0-0", namespace="ml")
    assert isinstance(err, Forbidden) and err.verb == "get" and err.resource == "pods/log"


def test_forbidden_without_a_readable_message_falls_back_to_the_attempted_verb() -> None:
    err = from_api(403, b"nope", verb="patch", resource="finetunejobs.kubetune.io", name="x", namespace="ml")
    assert isinstance(err, Forbidden) and err.verb == "patch"


def test_not_found_and_already_exists() -> None:
    assert isinstance(
        from_api(404, {}, verb="get", resource="finetunejobs.kubetune.io", name="x", namespace="ml"), NotFound
    )
    err = from_api(409, {}, verb="create", resource="finetunejobs.kubetune.io", name="x", namespace="ml")
    assert isinstance(err, AlreadyExists) and "already exists in namespace ml" in str(err)


def test_api_server_refusal_becomes_spec_invalid_with_each_field() -> None:
    body = {"code": 422, "message": "FineTuneJob.kubetune.io \"x\" is invalid",
            "details": {"causes": [{"field": "spec.lora", "message": "spec.lora is only allowed with spec.method: lora"},
                                   {"field": "spec.training.learningRate", "message": "must be <= 1"}]}}  # fmt: skip
    err = from_api(422, body, verb="create", resource="finetunejobs.kubetune.io", name="x", namespace="ml")
    assert isinstance(err, SpecInvalid)
    assert [p.field for p in err.problems] == ["spec.lora", "spec.training.learningRate"]


def test_submit_refuses_a_bad_manifest_before_any_call(tmp_path: Path) -> None:
    doc = manifest(training={"learningRate": 5, "perDeviceBatchSize": 0})
    with pytest.raises(SpecInvalid) as exc:
        checked(doc)
    fields = {p.field for p in exc.value.problems}
    assert {"spec.training.learningRate", "spec.training.perDeviceBatchSize"} <= fields


def test_a_yaml_path_a_dict_and_a_model_submit_the_same_manifest(tmp_path: Path) -> None:
    path = ROOT / "examples" / "cpu-2node-lora.yaml"
    from_path = checked(path)
    model = FineTuneJob.model_validate(from_path)
    assert (
        checked(model)["spec"]
        == FineTuneJob.model_validate(checked(from_path)).model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )["spec"]
    )
    assert checked(dict(from_path))["metadata"]["name"] == from_path["metadata"]["name"]
    empty = tmp_path / "x.yaml"
    empty.write_text("kind: ConfigMap\n")
    with pytest.raises(SpecInvalid, match="no FineTuneJob document"):
        checked(empty)


def test_an_object_the_operator_refused_still_reads_with_its_status() -> None:
    obj = manifest(training={"learningRate": 5})
    obj["status"] = {"phase": "Failed", "message": "spec.training.learningRate: must be <= 1.0"}
    job = from_object(obj)
    assert job.status is not None and job.status.phase == "Failed"


def _job(phase: str | None, step: int | None = None, loss: float | None = None, **status: Any) -> FineTuneJob:
    doc = manifest()
    doc["status"] = {"phase": phase, **status}
    if step is not None:
        doc["status"]["progress"] = {"step": step, "totalSteps": 10, "percent": step * 10.0, "loss": loss,
                                     "updatedAt": f"2026-01-01T00:00:{step:02d}Z"}  # fmt: skip
    return FineTuneJob.model_validate(doc)


class Replay:
    """A backend that replays watch events (the real one is exercised against an API server in e2e)."""

    namespace = "ml"

    def __init__(self, states: list[FineTuneJob]):
        self.states = states

    def watch(
        self, name: str | None = None, timeout: float | None = None
    ) -> Iterator[tuple[str, FineTuneJob]]:
        for i, job in enumerate(self.states):
            yield ("ADDED" if i == 0 else "MODIFIED"), job


def test_wait_reports_each_new_progress_once_and_returns_on_success() -> None:
    states = [_job("Pending"), _job("Running", 1, 2.0), _job("Running", 1, 2.0, restarts=0),
              _job("Running", 5, 1.0), _job("Succeeded", 10, 0.5)]  # fmt: skip
    seen: list[int | None] = []
    phases: list[str] = []
    done = Client(Replay(states)).wait(
        "demo", on_progress=lambda p: seen.append(p.step), on_phase=phases.append
    )  # type: ignore[arg-type]
    assert done.status is not None and done.status.phase == "Succeeded"
    assert seen == [1, 5, 10]
    assert phases == ["Pending", "Running", "Succeeded"]


def test_wait_raises_job_failed_with_the_trainers_reason() -> None:
    failed = _job(
        "Failed",
        lastFailure={
            "pod": "demo-r0-0",
            "exitCode": 66,
            "reason": "DatasetInvalid",
            "message": "line 3: not JSON",
        },
    )
    with pytest.raises(JobFailed, match="DatasetInvalid.*line 3"):
        Client(Replay([_job("Running"), failed])).wait("demo")  # type: ignore[arg-type]


def test_wait_for_suspended_returns_on_suspended() -> None:
    job = Client(Replay([_job("Running", 2, 1.0), _job("Suspended", 2, 1.0)])).wait(
        "demo", until={"Suspended", "Failed"}
    )  # type: ignore[arg-type]
    assert job.status is not None and job.status.phase == "Suspended"


def test_wait_times_out_when_the_watch_ends_first() -> None:
    with pytest.raises(TimeoutError, match="not Succeeded"):
        Client(Replay([_job("Running", 2, 1.0)])).wait("demo", timeout=0.1)  # type: ignore[arg-type]


def test_stream_progress_yields_new_readings_until_the_job_ends() -> None:
    states = [_job("Initializing"), _job("Running", 2, 1.5), _job("Running", 2, 1.5), _job("Running", 4, 1.2),
              _job("Succeeded", 10, 0.4), _job("Succeeded", 10, 0.4)]  # fmt: skip
    assert [(p.step, p.loss) for p in Client(Replay(states)).stream_progress("demo")] == [
        (2, 1.5),
        (4, 1.2),
        (10, 0.4),
    ]  # type: ignore[arg-type]


def test_new_progress_ignores_a_reread_of_the_same_step() -> None:
    a = _job("Running", 3, 1.0).status.progress  # type: ignore[union-attr]
    b = a.model_copy(update={"updated_at": "later"})  # type: ignore[union-attr]
    assert new_progress(None, a) and not new_progress(a, b) and not new_progress(a, None)


def test_the_get_row_shows_phase_progress_loss_and_age() -> None:
    job = _job("Running", 4, 1.23456)
    job.metadata.__pydantic_extra__["creationTimestamp"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    r = row(job, datetime(2026, 1, 1, 0, 3, 5, tzinfo=timezone.utc))
    assert (r["PHASE"], r["PROGRESS"], r["STEP"], r["LOSS"], r["AGE"]) == (
        "Running",
        40.0,
        "4/10",
        "1.2346",
        "3m05s",
    )
    assert bar(40.0, width=10) == "████░░░░░░  40.0%" and bar(None) == ""


def test_describe_shows_conditions_failure_and_artifacts() -> None:
    job = _job("Failed", 3, 2.0, restarts=1,
               conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "1 restart",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
               lastFailure={"pod": "demo-r1-0", "exitCode": 76, "reason": "StorageUnavailable", "message": "S3 down"},
               lastCheckpoint={"step": 3, "uri": "s3://out/demo/checkpoints/step-00000003/", "time": "2026-01-01T00:00:00Z"})  # fmt: skip
    text = describe(
        job,
        [
            {
                "type": "Warning",
                "reason": "Failed",
                "message": "gave up",
                "lastTimestamp": "2026-01-01T00:00:01Z",
            }
        ],
    )
    assert "BackoffLimitExceeded" in text and "exit code 76 (StorageUnavailable): S3 down" in text
    assert "Last checkpoint: step 3 at 2026-01-01T00:00:00Z: s3://out/demo/checkpoints/step-00000003/" in text
    assert "s3://out/demo/model/" in text and "(when it succeeds)" in text and "gave up" in text


def test_describe_shows_the_tracking_run_and_the_usage_per_run_and_in_total() -> None:
    usage = {"wallSeconds": 5400.0, "nodeSeconds": 10800.0, "gpuSeconds": 86400.0, "estimatedCost": 236.0, "currency": "USD",
             "runs": [{"run": 1, "wallSeconds": 1800.0, "nodeSeconds": 3600.0, "gpuSeconds": 28800.0, "estimatedCost": 80.0},
                      {"run": 2, "wallSeconds": 3600.0, "nodeSeconds": 7200.0, "gpuSeconds": 57600.0, "estimatedCost": 156.0}]}  # fmt: skip
    job = _job("Succeeded", 10, 0.5, usage=usage, tracking={"mlflowRun": "http://mlflow:5000/#/experiments/1/runs/r1",
                                                            "mlflowModelVersion": "support-bot/3"})  # fmt: skip
    lines = describe(job, []).splitlines()
    assert (
        "MLflow run:   http://mlflow:5000/#/experiments/1/runs/r1" in lines
        and "Registered:   support-bot/3" in lines
    )
    table = lines[lines.index("Usage:") + 1 :][:4]
    assert table[1].split() == ["total", "24.00", "h", "3.00", "h", "1.50", "h", "236.00", "USD"]
    assert table[3].split() == ["run", "2", "16.00", "h", "2.00", "h", "1.00", "h", "156.00", "USD"]


# ---------------------------------------------------------------- downloads


def _output(tmp_path: Path) -> Path:
    """A finished LoRA output directory: adapter/, model/ and the manifest of both."""
    out = tmp_path / "out"
    files = {"adapter/adapter_model.safetensors": b"a" * 100, "model/model.safetensors": b"m" * 300,
             "model/config.json": b"{}", "metrics.json": b"{}"}  # fmt: skip
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    table = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}
    (out / "manifest.json").write_text(json.dumps({"files": table}))
    return out


def _arts(out: Path, merged: bool = True) -> Artifacts:
    base = f"file://{out}"
    return Artifacts(adapter=f"{base}/adapter/", merged_model=f"{base}/model/" if merged else None,
                     metrics=f"{base}/metrics.json", manifest=f"{base}/manifest.json")  # fmt: skip


def test_download_takes_the_merged_model_and_checks_it_against_the_manifest(tmp_path: Path) -> None:
    got = storage.download(_arts(_output(tmp_path)), StorageSpec(), tmp_path / "dl")
    assert got.path == tmp_path / "dl" / "model"
    assert sorted(p.name for p in got.files) == ["config.json", "model.safetensors"] and got.verified == 2


def test_download_takes_the_adapter_when_nothing_was_merged(tmp_path: Path) -> None:
    got = storage.download(_arts(_output(tmp_path), merged=False), StorageSpec(), tmp_path / "dl")
    assert [p.name for p in got.files] == ["adapter_model.safetensors"]
    with pytest.raises(DownloadError, match="mergeAdapter: false"):
        storage.download(
            _arts(_output(tmp_path), merged=False), StorageSpec(), tmp_path / "dl2", which="model"
        )


def test_download_refuses_a_file_that_differs_from_the_manifest(tmp_path: Path) -> None:
    out = _output(tmp_path)
    (out / "model" / "model.safetensors").write_bytes(b"x" * 300)
    with pytest.raises(DownloadError, match="model/model.safetensors: content differs"):
        storage.download(_arts(out), StorageSpec(), tmp_path / "dl")


def test_report_fetches_the_card_and_whichever_plots_exist_checked_against_the_manifest(
    tmp_path: Path,
) -> None:
    out = _output(tmp_path)
    with pytest.raises(DownloadError, match="no README.md"):
        storage.fetch_report(_arts(out), StorageSpec(), tmp_path / "none")
    (out / "README.md").write_text("# demo\n")
    (out / "loss.png").write_bytes(b"png")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["README.md"] = {"sha256": hashlib.sha256(b"# demo\n").hexdigest(), "size": 7}
    (out / "manifest.json").write_text(json.dumps(manifest))
    got = storage.fetch_report(_arts(out), StorageSpec(), tmp_path / "rep")
    assert [p.name for p in got.files] == ["README.md", "loss.png"] and got.verified == 1
    (out / "README.md").write_text("# edited\n")
    with pytest.raises(DownloadError, match="README.md: content differs"):
        storage.fetch_report(_arts(out), StorageSpec(), tmp_path / "rep2")


class OneJob:
    """A backend holding one finished job whose S3 endpoint is an in-cluster address."""

    namespace = "ml"

    def get(self, name: str) -> FineTuneJob:
        doc = manifest(storage={"endpoint": "http://minio.minio.svc:9000", "region": "eu-1", "pathStyle": True,
                                "secretRef": {"name": "s3"}})  # fmt: skip
        doc["status"] = {"phase": "Succeeded", "artifacts": {"manifest": "s3://b/runs/demo/manifest.json",
                                                             "mergedModel": "s3://b/runs/demo/model/"}}  # fmt: skip
        return FineTuneJob.model_validate(doc)

    def secret_data(self, name: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


def test_the_s3_endpoint_can_be_the_one_this_machine_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(OneJob())  # type: ignore[arg-type]
    assert client.artifacts("demo").storage.endpoint == "http://minio.minio.svc:9000"
    here = client.artifacts("demo", endpoint="http://127.0.0.1:9000")
    assert (here.storage.endpoint, here.storage.region, here.storage.path_style) == (
        "http://127.0.0.1:9000",
        "eu-1",
        True,
    )
    assert here.credentials == {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    with pytest.raises(DownloadError, match="S3 endpoint 'minio:9000': give a URL"):
        client.artifacts("demo", endpoint="minio:9000")

    # Nothing listens there: one line naming the endpoint and the flag, not an internal error. (A real boto3
    # client against a closed port, with one attempt instead of the five a real download makes.)
    import boto3
    from botocore.config import Config

    def one_attempt(spec: StorageSpec, credentials: dict[str, str] | None = None) -> Any:
        return boto3.client("s3", endpoint_url=spec.endpoint, region_name=spec.region, aws_access_key_id="k",
                            aws_secret_access_key="s", config=Config(retries={"max_attempts": 1}))  # fmt: skip

    monkeypatch.setattr(storage, "s3_client", one_attempt)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for fetch in (lambda: client.report("demo", tmp_path / "card", endpoint=closed),
                  lambda: client.download("demo", tmp_path / "dl", endpoint=closed)):  # fmt: skip
        with pytest.raises(DownloadError) as err:
            fetch()
        assert f"cannot connect to S3 at {closed} from this machine" in str(err.value), err.value
        assert "--s3-endpoint URL" in str(err.value) and "\n" not in str(err.value)


def test_download_before_success_says_so(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="has the job succeeded"):
        storage.download(_arts(tmp_path / "nothing"), StorageSpec(), tmp_path / "dl")


def test_the_local_backend_reads_the_trainers_termination_message(tmp_path: Path) -> None:
    """The failure a notebook sees is the trainer's own TerminationMessage from `kubetune run --work-dir`, not a
    parse of the log: here a process stands in for `kubetune run` and leaves the message a failing rank leaves."""
    import subprocess
    import sys

    from kubetune.api.contract import RUN_TERMINATION_FILE, TerminationMessage
    from kubetune.client.local import LocalBackend, LocalRun

    run = LocalRun(doc={}, dir=tmp_path)
    run.work.mkdir(parents=True)
    told = TerminationMessage.build(66, "train.jsonl line 3: not JSON; fix the record")
    (run.work / RUN_TERMINATION_FILE).write_text(told.to_text())
    backend = LocalBackend(workdir=tmp_path)
    run.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(66)"])
    run.proc.wait()
    backend._refresh(run)
    assert run.phase == "Failed" and run.failure == (
        66,
        "DatasetInvalid",
        "train.jsonl line 3: not JSON; fix the record",
    )

    (
        run.work / RUN_TERMINATION_FILE
    ).unlink()  # killed before any rank could say why: kubetune run's exit code
    run.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(75)"])
    run.proc.wait()
    backend._refresh(run)
    assert run.failure == (75, "InfrastructureError", f"see {run.log}")


def test_kubetune_run_leaves_its_config_in_the_work_dir_the_sdk_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.api.contract import RUN_CONFIG_FILE, RUN_TERMINATION_FILE
    from kubetune.api.trainer_config import TrainerConfig
    from kubetune.cli import run as run_cli
    from kubetune.cli.main import main

    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"},
           "spec": {"model": {"source": str(tmp_path / "model")}, "dataset": {"train": str(tmp_path / "t.jsonl")},
                    "output": {"uri": str(tmp_path / "out")}}}  # fmt: skip
    (tmp_path / "t.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "job.yaml").write_text(json.dumps(doc))
    work = tmp_path / "work"
    work.mkdir()
    (work / RUN_TERMINATION_FILE).write_text("an earlier run's message")
    # --dry-run writes nothing, not even into --work-dir
    assert main(["run", str(tmp_path / "job.yaml"), "--dry-run", "--work-dir", str(work)]) == 0
    assert sorted(p.name for p in work.iterdir()) == [RUN_TERMINATION_FILE]
    # a run writes its config there before the trainer starts (the trainer itself is stubbed: no training here)
    monkeypatch.setattr(
        run_cli, "trainer_command", lambda world_size, config_path: [sys.executable, "-c", "pass"]
    )
    main(["run", str(tmp_path / "job.yaml"), "--work-dir", str(work)])
    assert TrainerConfig.load(work / RUN_CONFIG_FILE).progress_port > 0
    assert not (work / RUN_TERMINATION_FILE).exists()
