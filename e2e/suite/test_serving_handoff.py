"""Issue 15, items 4-5: a job that succeeds hands its model to serving, and carries a model card.

Against the real API server with KServe's own CRDs (v0.17.0 from its Go module, see build.sh):
one 2-rank LoRA job with `spec.serving: {kind: InferenceService}` succeeds while the InferenceService
API is not installed yet (a Serving=False condition and a Warning, no crash); once the CRDs are
applied, the next look creates the InferenceService: accepted by KServe's schema, owned by the job,
labelled, pointing at the merged model in S3 (the files are there), named in status.serving. The
adapter and Deployment variants are admitted by a server-side dry run. `kubetune report` fetches the
card and its plots from MinIO. Deleting the job deletes the InferenceService (owner reference).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml
from conftest import VENV_BIN, install_kserve_crds, job_doc, wait_for
from kubetune.api.models import FineTuneJobSpec
from kubetune.render.serving import render_serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "happy"
ISVC = "inferenceservices.serving.kserve.io"


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def owned_by(obj: dict[str, Any], ftj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with the FineTuneJob as its controller owner, as the operator writes it."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [{"apiVersion": ftj["apiVersion"], "kind": "FineTuneJob", "name": ftj["metadata"]["name"],
                                           "uid": ftj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]  # fmt: skip
    return obj


def dry_run(kctl: Any, ns: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kctl(
        "-n",
        ns,
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(obj),
        check=False,
    )


def test_a_succeeded_job_is_served_by_an_owned_inference_service(
    cluster, kctl, suite_ns, s3, s3_data, node, operator, tmp_path
):
    kctl("delete", "crd", ISVC, "--ignore-not-found", "--wait=true")  # KServe not installed yet
    name = "serve-lora"
    doc = job_doc(name, s3, s3_data, steps=8, checkpoint_steps=8)
    doc["spec"]["serving"] = {
        "kind": "InferenceService",
        "serviceAccountName": "kserve-s3",
        "args": ["--max-model-len=64"],
    }
    t0 = time.monotonic()
    kctl.apply(suite_ns, doc)
    wait_for("Succeeded or Failed", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 300, 1)
    status = kctl.status(suite_ns, name)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    print(f"\n[suite] {name}: Succeeded in {time.monotonic() - t0:.1f}s", file=sys.stderr)

    # No InferenceService API: a condition and a Warning, the job stays Succeeded, the operator stays up.
    wait_for(
        "Serving=False",
        lambda: condition(kctl.status(suite_ns, name), "Serving").get("status") == "False",
        30,
    )
    missing = condition(kctl.status(suite_ns, name), "Serving")
    assert missing["reason"] == "ServingAPIMissing" and "install KServe" in missing["message"], missing
    assert kctl.phase(suite_ns, name) == "Succeeded" and operator.healthy()

    # KServe's CRDs arrive; the operator's next look at the job (here: an annotation) creates the InferenceService.
    install_kserve_crds(kctl)
    kctl("-n", suite_ns, "annotate", "ftj", name, "example.com/kserve-installed=yes")
    wait_for("status.serving", lambda: kctl.status(suite_ns, name).get("serving"), 60)
    status = kctl.status(suite_ns, name)
    ftj = kctl.get(suite_ns, "ftj", name)
    isvc = kctl.get(suite_ns, ISVC, name)
    assert isvc is not None, kctl("-n", suite_ns, "get", ISVC, check=False).stderr
    merged = status["artifacts"]["mergedModel"].rstrip("/")
    assert status["serving"] == {"kind": "InferenceService", "name": name, "uri": merged}
    served = condition(status, "Serving")
    assert served["status"] == "True" and served["reason"] == "ServingCreated", served
    owner = isvc["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner.get("controller")) == (
        "FineTuneJob",
        ftj["metadata"]["uid"],
        True,
    )
    labels = isvc["metadata"]["labels"]
    assert labels["kubetune.io/serving"] == name and labels["app.kubernetes.io/managed-by"] == "kubetune"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "huggingface" and model["storageUri"] == merged
    bucket, _, prefix = merged.removeprefix("s3://").partition("/")
    keys = {
        o["Key"].removeprefix(prefix + "/")
        for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    }
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= keys, sorted(
        keys
    )  # it points at the model
    events = kctl.get(suite_ns, "events", None, f"--field-selector=involvedObject.name={name}")
    assert {"ServingAPIMissing", "ServingCreated"} <= {e["reason"] for e in events}

    # KServe's schema is really checked: a wrong type is refused, the adapter and Deployment variants are admitted.
    bad = copy.deepcopy(isvc)
    bad["metadata"] = {"name": "bad", "namespace": suite_ns}
    bad["spec"]["predictor"]["minReplicas"] = "two"
    refused = dry_run(kctl, suite_ns, bad)
    assert refused.returncode != 0 and "minReplicas" in refused.stderr, refused.stderr
    for serving in ({"kind": "InferenceService", "name": f"{name}-adapter", "model": "adapter"},
                    {"kind": "Deployment", "name": f"{name}-deploy", "image": "registry.example/vllm-openai:v0.11.0",
                     "args": ["--model", "$(KUBETUNE_MODEL_URI)"], "gpus": 1}):  # fmt: skip
        spec = FineTuneJobSpec.model_validate({**doc["spec"], "serving": serving})
        obj = owned_by(render_serving(spec, name, suite_ns, status["artifacts"]), ftj)
        r = dry_run(kctl, suite_ns, obj)
        assert r.returncode == 0, (serving["kind"], r.stderr)

    # The model card, fetched from MinIO with the job's Secret, from the host: at MinIO's address here
    # (--s3-endpoint), since the job's endpoint is where pods reach it (on the real node 10.0.0.20, not routable here).
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run([str(VENV_BIN / "kubetune"), "report", name, "-n", suite_ns, "--output-dir", str(tmp_path / "card"), "--raw",
                          "--s3-endpoint", s3.endpoint], env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.startswith("---\n") and "\ntags:\n- kubetune\n" in out.stdout
    )  # the Hub's front matter (--raw: as written)
    assert (
        f"\n---\n\n# {name}\n" in out.stdout
        and "| eval loss |" in out.stdout
        and "## Hyper-parameters" in out.stdout
    )
    for png in ("loss.png", "eval.png"):
        assert (tmp_path / "card" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "saved README.md, eval.png, loss.png" in out.stdout

    # A later run's model (its status, as the operator writes it after run 2): the job's own InferenceService is re-pointed.
    run2 = merged.replace(f"/runs/{name}/", f"/runs/{name}/run-2/")
    kctl("-n", suite_ns, "patch", "ftj", name, "--subresource=status", "--type=merge",
         "-p", json.dumps({"status": {"artifacts": {"mergedModel": run2 + "/"}}}))  # fmt: skip
    wait_for(
        "the InferenceService re-pointed",
        lambda: kctl.get(suite_ns, ISVC, name)["spec"]["predictor"]["model"]["storageUri"] == run2,
        60,
    )
    wait_for("status.serving follows", lambda: kctl.status(suite_ns, name)["serving"]["uri"] == run2, 30)

    # A name taken by an object the job does not own: left alone, and the condition says what to do.
    foreign = copy.deepcopy(bad)
    foreign["metadata"]["name"] = "someone-elses"
    foreign["spec"]["predictor"]["minReplicas"] = 1
    kctl.apply(suite_ns, foreign)
    kctl(
        "-n",
        suite_ns,
        "patch",
        "ftj",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"serving": {"name": "someone-elses"}}}),
    )
    wait_for(
        "ServingNameTaken",
        lambda: condition(kctl.status(suite_ns, name), "Serving").get("reason") == "ServingNameTaken",
        60,
    )
    untouched = kctl.get(suite_ns, ISVC, "someone-elses")
    assert (
        not untouched["metadata"].get("ownerReferences")
        and untouched["spec"]["predictor"]["minReplicas"] == 1
    )
    kctl("-n", suite_ns, "delete", ISVC, "someone-elses")

    # Deleting the job deletes what serves it (garbage collection by owner reference).
    kctl("-n", suite_ns, "delete", "ftj", name, "--wait=false")
    wait_for("the InferenceService collected", lambda: kctl.get(suite_ns, ISVC, name) is None, 60)
