"""From a finished job to a model in a registry: `spec.output.publish.oci` against the CNCF distribution
registry on loopback (htpasswd auth). A job that passes its evaluation gate is published; the pushed manifest is pulled back and its layer digests checked
against the files in S3; a wrong password fails the job naming the Secret, with nothing pushed; pushing the
same files again gives the same manifest digest; with `spec.serving` the InferenceService the operator
creates (KServe's own CRDs installed) loads the model from that digest-pinned reference. (Serving
itself, S3 storage URIs, adapters and the missing-API case: e2e/suite/test_serving_handoff.py.)

The registry runs on the host. Pods reach it at `pod_registry` (on the real node through a forwarder at
10.0.0.20), so the manifests, the pods' dockerconfigjson and the references in status name that host; the
test's own oras client talks to `registry.host` (loopback)."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import install_kserve_crds, job_doc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "publish"
MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
ISVC = "inferenceservices.serving.kserve.io"


@pytest.fixture(scope="module")
def pod_registry(node: Any, registry: Any) -> str:
    """The registry's `host:port` as pods reach it (the node agent: loopback, = `registry.host`)."""
    return str(node.pod_endpoint(registry.port))


def s3_files(s3: Any, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for obj in page.get("Contents") or []:
            out[obj["Key"][len(prefix) :]] = client.get_object(Bucket=s3.bucket, Key=obj["Key"])[
                "Body"
            ].read()
    return out


def manifest_bytes(registry: Any, repository: str, ref: str) -> bytes:
    client = registry.client()
    container = client.get_container(f"{registry.host}/{repository}:latest")
    url = f"http://{registry.host}/v2/{repository}/manifests/{ref}"
    response = client.do_request(url, "GET", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 200, (container, response.status_code, response.text)
    return response.content


def publish_job(
    name: str, s3: Any, s3_data: dict[str, str], pod_registry: str, secret: str
) -> dict[str, Any]:
    publish = {"oci": f"{pod_registry}/kubetune/{name}:v1", "credentialsSecret": secret, "plainHTTP": True}
    return job_doc(
        name, s3, s3_data, example="lora", steps=6, checkpoint_steps=6, **{"output.publish": publish}
    )


def finished(kctl: Any, ns: str, name: str) -> dict[str, Any]:
    wait_for("Succeeded or Failed", lambda: kctl.phase(ns, name) in ("Succeeded", "Failed"), 300, 1)
    return kctl.status(ns, name)


def test_a_finished_job_is_published_and_its_layers_are_the_files_in_s3(
    kctl, suite_ns, s3, s3_data, registry, pod_registry
):
    name = "publish-lora"
    install_kserve_crds(kctl)
    kctl.apply(suite_ns, registry.secret("regcred", suite_ns, host=pod_registry))
    doc = publish_job(name, s3, s3_data, pod_registry, "regcred")
    doc["spec"]["serving"] = {"kind": "InferenceService"}
    # A gate the model passes (eval loss falls from about 3.4 to 2.9 in these 6 steps): published only then.
    doc["spec"]["evaluation"] = {"gate": {"maxEvalLoss": 3.2}}
    kctl.apply(suite_ns, doc)
    status = finished(kctl, suite_ns, name)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["evaluation"]["gatePassed"] is True and status["evaluation"]["evalLoss"] <= 3.2, status[
        "evaluation"
    ]

    # status.artifacts.oci: digest-pinned, and the digest is the manifest's, pulled back by tag.
    pinned = status["artifacts"]["oci"]
    match = re.fullmatch(rf"{re.escape(pod_registry)}/kubetune/{name}@(sha256:[0-9a-f]{{64}})", pinned)
    assert match, pinned
    raw = manifest_bytes(registry, f"kubetune/{name}", "v1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == match.group(1)
    manifest = json.loads(raw)
    assert manifest["artifactType"] == MODELPACK
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"

    # Each layer is one file of model/ (the merged model) or of the model card, its digest the sha256 of
    # the object in S3.
    files = s3_files(s3, f"runs/{name}/model/")
    card = {
        k: v for k, v in s3_files(s3, f"runs/{name}/").items() if k in ("README.md", "loss.png", "eval.png")
    }
    assert "README.md" in card, sorted(card)
    files.update(card)
    layers = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in manifest["layers"]}
    assert set(layers) == set(files), (sorted(layers), sorted(files))
    for rel, data in files.items():
        assert layers[rel]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest(), rel
        assert layers[rel]["size"] == len(data), rel
    assert layers["model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    # ... and the registry holds those bytes (not only a descriptor).
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "weights"
        registry.client().download_blob(
            f"{registry.host}/kubetune/{name}:v1", layers["model.safetensors"]["digest"], str(blob)
        )
        assert blob.read_bytes() == files["model.safetensors"]

    # The InferenceService loads the model from the digest-pinned reference (not from the moving tag).
    wait_for("InferenceService", lambda: kctl.get(suite_ns, ISVC, name) is not None, 60, 1)
    isvc = kctl.get(suite_ns, ISVC, name)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"oci://{pinned}", isvc["spec"]

    # metrics.json names the same reference.
    metrics = json.loads(s3_files(s3, f"runs/{name}/metrics.json")[""])
    assert metrics["oci"]["reference"] == pinned and metrics["oci"]["directory"] == "model"

    # Pushing the same files again (the trainer's own code, from S3, from the host) gives the same manifest digest.
    from kubetune.api.contract import FileEntry  # noqa: PLC0415
    from kubetune.api.models import PublishSpec  # noqa: PLC0415
    from kubetune_trainer import publish  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "auth.json").write_text(registry.dockerconfigjson())
        table = {}
        for rel, data in files.items():
            at = rel if rel in card else f"model/{rel}"
            (out / at).parent.mkdir(parents=True, exist_ok=True)
            (out / at).write_bytes(data)
            table[at] = FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        spec = PublishSpec(
            oci=f"{registry.host}/kubetune/{name}:v1", credentials_secret="regcred", plain_http=True
        )
        parts = publish.with_card(
            publish.layers(out, table, "model"), out, table, ["README.md", "loss.png", "eval.png"]
        )
        assert (
            publish.push(
                spec, parts, out / "auth.json", manifest.get("annotations")
            )  # the lineage annotations too
            == f"{registry.host}/kubetune/{name}@{match.group(1)}"
        )


def test_a_refused_password_fails_the_job_naming_the_secret_and_pushes_nothing(
    kctl, suite_ns, s3, s3_data, registry, pod_registry
):
    name = "publish-refused"
    wrong = "not-the-password"
    kctl.apply(suite_ns, registry.secret("regcred-wrong", suite_ns, password=wrong, host=pod_registry))
    kctl.apply(suite_ns, publish_job(name, s3, s3_data, pod_registry, "regcred-wrong"))
    status = finished(kctl, suite_ns, name)
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    failure = status["lastFailure"]
    assert failure["reason"] == "CredentialsInvalid", failure
    assert "regcred-wrong" in failure["message"] and "401" in failure["message"], failure
    assert "\n" not in failure["message"] and wrong not in json.dumps(status)
    assert status.get("restarts", 0) == 0  # a user error: no restart can help
    # Refused before training (a HEAD with the credentials): no model written, nothing pushed.
    assert "model/model.safetensors" not in s3_files(s3, f"runs/{name}/")
    client = registry.client()
    response = client.do_request(f"http://{registry.host}/v2/kubetune/{name}/tags/list", "GET")
    assert response.status_code == 404, (response.status_code, response.text)


def test_a_job_that_fails_its_gate_publishes_nothing(kctl, suite_ns, s3, s3_data, registry, pod_registry):
    name = "publish-gated"
    kctl.apply(suite_ns, registry.secret("regcred", suite_ns, host=pod_registry))
    doc = publish_job(name, s3, s3_data, pod_registry, "regcred")
    doc["spec"]["training"]["maxSteps"] = 2
    doc["spec"]["evaluation"] = {"gate": {"maxEvalLoss": 0.01}}  # out of reach in 2 steps
    kctl.apply(suite_ns, doc)
    status = finished(kctl, suite_ns, name)
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    assert status["lastFailure"]["reason"] == "EvaluationGateFailed", status["lastFailure"]
    assert status["evaluation"]["gatePassed"] is False and status["evaluation"]["evalLoss"] > 0.01
    assert "oci" not in (status.get("artifacts") or {})
    # The artifacts stay in S3 for inspection, with no reference in metrics.json; the registry has no such repository.
    files = s3_files(s3, f"runs/{name}/")
    assert "model/model.safetensors" in files and "oci" not in json.loads(files["metrics.json"])
    response = registry.client().do_request(f"http://{registry.host}/v2/kubetune/{name}/tags/list", "GET")
    assert response.status_code == 404, (response.status_code, response.text)
