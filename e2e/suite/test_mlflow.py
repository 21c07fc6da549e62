"""spec.tracking.mlflow through the operator, against a real MLflow tracking server: `mlflow server` from pip
(tests/trainer/mlflow_server.py: its own venv, pinned in .ci/mlflow-server-requirements.txt) with MLflow's
basic-auth app, SQLite backend, artifacts proxied by the server into the suite's MinIO bucket. What was
logged is read back through MLflow's own client (as the admin).

- A job that logs in as a user from its credentialsSecret, publishes to the suite's registry and passes its
  gate: every metric equals metrics.json, the run's URL is in status, the card and metrics.json are the
  run's artifacts (in MinIO, through the server), and the registered model version's source is the OCI
  reference the job published (its tags carry the S3 URI).
- A job whose Secret holds a wrong password fails before training, CredentialsInvalid naming the Secret,
  no checkpoint written, no run created.

The restart case (a killed gang continues the same run, each step once) and the server going away mid-run
are tested with the same server program in tests/trainer/test_tracking_mlflow.py (real torchrun, moto's S3):
a gang restart here would cost a minute more of this suite for the same trainer code path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, job_doc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "publish"
EXPERIMENT = "kubetune-e2e"
ADMIN_PASSWORD = "admin-pw-3c9d1e77b2a4-e2e"
USER, PASSWORD = "kubetune-job", "job-pw-8f2a61c4d09e-e2e"  # must appear in no status, log or artifact


def _server_module() -> Any:
    """tests/trainer/mlflow_server.py (the tests' server, shared with the e2e suite; it imports trainer_helpers)."""
    here = str(ROOT / "tests" / "trainer")
    spec = importlib.util.spec_from_file_location("kubetune_mlflow_server", f"{here}/mlflow_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, here)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(here)
    return module


@pytest.fixture(scope="module")
def mlflow(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The basic-auth MLflow server on the host's loopback (a new store each session), its artifacts in MinIO
    under `mlflow/`."""
    server_mod = _server_module()
    creds = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    server = server_mod.MlflowServer(tmp_path_factory.mktemp("mlflow"), s3.endpoint, bucket=s3.bucket, prefix="mlflow",
                                     s3_credentials=creds, admin_password=ADMIN_PASSWORD)  # fmt: skip
    with server:
        server.create_user(USER, PASSWORD)
        yield server
    print(f"[suite] MLflow server log: {server.log}", file=sys.stderr)


@pytest.fixture(scope="module")
def pod_mlflow(node: Any, mlflow: Any) -> str:
    """The server's URI as pods reach it (on the real node through a forwarder at 10.0.0.20)."""
    return "http://" + str(node.pod_endpoint(mlflow.port))


@pytest.fixture
def admin(mlflow: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """MLflow's client on the host, logged in as the server's admin."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return MlflowClient(tracking_uri=mlflow.uri, registry_uri=mlflow.uri)


def mlflow_secret(name: str, password: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}}  # fmt: skip


def finished(kctl: Any, ns: str, name: str) -> dict[str, Any]:
    wait_for("Succeeded or Failed", lambda: kctl.phase(ns, name) in ("Succeeded", "Failed"), 300, 1)
    return kctl.status(ns, name)


def runs_for(admin: Any, output: str) -> list[Any]:
    experiment = admin.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return list(
        admin.search_runs([experiment.experiment_id], filter_string=f"tags.`kubetune.output` = '{output}'")
    )


def history(admin: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in admin.get_metric_history(run_id, key))


def s3_object(s3: Any, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def test_a_job_reports_its_run_and_registers_the_published_model(
    kctl, suite_ns, s3, s3_data, registry, node, mlflow, pod_mlflow, admin
):
    name = "mlflow-tracked"
    pod_registry = str(node.pod_endpoint(registry.port))
    kctl.apply(suite_ns, registry.secret("regcred", suite_ns, host=pod_registry))
    kctl.apply(suite_ns, mlflow_secret("mlflow-creds", PASSWORD))
    tracking = {
        "uri": pod_mlflow,
        "experiment": EXPERIMENT,
        "credentialsSecret": "mlflow-creds",
        "registerAs": "e2e-tiny",
    }
    publish = {"oci": f"{pod_registry}/kubetune/{name}:v1", "credentialsSecret": "regcred", "plainHTTP": True}
    doc = job_doc(name, s3, s3_data, steps=6, checkpoint_steps=6,
                  **{"tracking.mlflow": tracking, "output.publish": publish})  # fmt: skip
    kctl.apply(suite_ns, doc)
    status = finished(kctl, suite_ns, name)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    uid = kctl.get(suite_ns, "ftj", name)["metadata"]["uid"]
    output = f"s3://{s3.bucket}/runs/{name}"
    metrics = json.loads(s3_object(s3, f"runs/{name}/metrics.json"))
    assert metrics["worldSize"] == 2

    [run] = runs_for(admin, output)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == name
    tags = run.data.tags
    assert (
        tags["kubetune.uid"],
        tags["kubetune.namespace"],
        tags["kubetune.name"],
        tags["kubetune.run"],
    ) == (uid, suite_ns, name, "1")
    assert admin.get_experiment(run.info.experiment_id).name == EXPERIMENT
    # every point, read back through MLflow's client, equals metrics.json
    for key in ("loss", "learningRate", "tokensPerSecond"):
        assert history(admin, run_id, key) == [(p["step"], p[key]) for p in metrics["lossCurve"]], key
    assert [s for s, _ in history(admin, run_id, "loss")] == list(range(1, 7))
    assert history(admin, run_id, "evalLoss") == [(0, metrics["evalLossBefore"])] + [
        (e["step"], e["evalLoss"]) for e in metrics["evals"]
    ]
    assert run.data.params["training.maxSteps"] == "6" and run.data.params["worldSize"] == "2"

    # the run's URL in status (the address the pods used), and in metrics.json
    url = f"{pod_mlflow}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert status["tracking"]["mlflowRun"] == url and metrics["tracking"]["mlflowRun"] == url, status.get(
        "tracking"
    )
    assert metrics["tracking"]["delivery"]["MLflow"]["failed"] == 0

    # the card and metrics.json are the run's artifacts, stored by the server in MinIO
    assert {"README.md", "loss.png", "metrics.json"} <= {f.path for f in admin.list_artifacts(run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        logged = Path(admin.download_artifacts(run_id, "metrics.json", tmp)).read_bytes()
    assert logged == s3_object(s3, f"runs/{name}/metrics.json")
    stored = s3.client().list_objects_v2(
        Bucket=s3.bucket, Prefix=f"mlflow/{run.info.experiment_id}/{run_id}/"
    )
    assert any(o["Key"].endswith("/metrics.json") for o in stored.get("Contents") or []), stored

    # the registered version points at the published OCI artifact (digest-pinned), its tags at the S3 copy
    pinned = status["artifacts"]["oci"]
    [version] = admin.search_model_versions("name = 'e2e-tiny'")
    assert version.source == f"oci://{pinned}" and version.run_id == run_id
    assert version.tags["kubetune.model"] == f"{output}/model/" and version.tags["kubetune.oci"] == pinned
    assert status["tracking"]["mlflowModelVersion"] == f"e2e-tiny/{version.version}"
    digest = pinned.rsplit("@", 1)[1]
    got = registry.client().do_request(f"http://{registry.host}/v2/kubetune/{name}/manifests/{digest}", "GET",
                                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
    assert got.status_code == 200, got.status_code

    # metrics.json's one record of its inputs: MinIO's ETag as fetched, and the sha256 of the bytes trained on
    lineage = metrics["lineage"]
    assert "inputs" not in metrics
    [train] = [d for d in lineage["datasets"] if d["uri"] == s3_data["train"]]
    assert train["identity"].startswith("etag:"), train
    assert train["files"] == {
        "train.jsonl": hashlib.sha256(s3_object(s3, "data/spell-digits/train.jsonl")).hexdigest()
    }
    weights = hashlib.sha256(s3_object(s3, "data/tiny-llama/model.safetensors")).hexdigest()
    assert lineage["baseModel"]["files"]["model.safetensors"] == weights

    # the job's password is nowhere it could leak to
    logs = "".join(node.logs(suite_ns, p["metadata"]["name"]) for p in kctl.get(suite_ns, "pods") or [])
    for text in (
        json.dumps(status),
        json.dumps(metrics),
        logs,
        json.dumps(run.data.params),
        json.dumps(tags),
    ):
        assert PASSWORD not in text


def test_refused_credentials_fail_the_job_before_training_naming_the_secret(
    kctl, suite_ns, s3, s3_data, mlflow, pod_mlflow, admin
):
    name = "mlflow-refused"
    kctl.apply(suite_ns, mlflow_secret("mlflow-wrong", "not-the-password-0"))
    tracking = {"uri": pod_mlflow, "experiment": EXPERIMENT, "credentialsSecret": "mlflow-wrong"}
    kctl.apply(
        suite_ns, job_doc(name, s3, s3_data, steps=6, checkpoint_steps=2, **{"tracking.mlflow": tracking})
    )
    status = finished(kctl, suite_ns, name)
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    failure = status["lastFailure"]
    assert failure["reason"] == "CredentialsInvalid", failure
    assert "mlflow-wrong" in failure["message"] and pod_mlflow in failure["message"], failure
    assert "\n" not in failure["message"] and "not-the-password-0" not in json.dumps(status)
    assert status.get("restarts", 0) == 0  # a user error: no restart can help
    # refused before training: no checkpoint, no model, no run on the server
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"runs/{name}/")
    assert not [
        o["Key"] for o in listed.get("Contents") or [] if "/checkpoints/" in o["Key"] or "/model/" in o["Key"]
    ]
    assert runs_for(admin, f"s3://{s3.bucket}/runs/{name}") == []
