"""spec.serving: what the operator creates for a succeeded job, what it refuses, and how status says so."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from fake_cluster import FakeCluster
from kubetune.api.models import FineTuneJobStatus, ServingStatus
from kubetune.api.names import LABEL_SERVING
from kubetune.api.validation import SpecInvalid, parse_spec
from kubetune.controller.serving import hand_off
from kubetune.render.objects import render_pod_template
from kubetune.render.serving import ADAPTER_DIR, BASE_DIR, render_serving
from kubetune.status import serving as s
from operator_samples import BASE

NOW = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)
MERGED = {
    "mergedModel": "s3://out/demo/model/",
    "adapter": "s3://out/demo/adapter/",
    "metrics": "s3://out/demo/metrics.json",
}


def spec_with(serving: dict, **overrides):
    return parse_spec({**BASE["spec"], "serving": serving, **overrides}, name="demo")


def problems(serving: dict, **overrides) -> list[str]:
    with pytest.raises(SpecInvalid) as exc:
        spec_with(serving, **overrides)
    return [str(p) for p in exc.value.problems]


def test_inference_service_serves_the_merged_model_with_the_huggingface_runtime():
    obj = render_serving(spec_with({"kind": "InferenceService"}), "demo", "ml", MERGED)
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1" and obj["kind"] == "InferenceService"
    model = obj["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == "s3://out/demo/model"
    assert "storageUris" not in obj["spec"]["predictor"]  # KServe refuses storageUri and storageUris together
    assert obj["metadata"]["labels"][LABEL_SERVING] == "demo"
    assert "kubetune.io/job-name" not in obj["metadata"]["labels"]  # KServe copies these onto its pods


OCI = "registry.local:5000/models/demo@sha256:" + "a" * 64


def test_a_published_model_is_served_from_its_digest_pinned_oci_reference():
    spec = spec_with(
        {"kind": "InferenceService"},
        output={"uri": "s3://out/demo", "publish": {"oci": "registry.local:5000/models/demo:v1"}},
    )
    obj = render_serving(spec, "demo", "ml", {**MERGED, "oci": OCI})
    assert obj["spec"]["predictor"]["model"]["storageUri"] == "oci://" + OCI


def test_a_published_adapter_is_not_mistaken_for_the_model():
    publish = {"oci": "registry.local:5000/models/demo:v1", "artifact": "adapter"}
    spec = spec_with({"kind": "InferenceService"}, output={"uri": "s3://out/demo", "publish": publish})
    obj = render_serving(spec, "demo", "ml", {**MERGED, "oci": OCI})
    assert obj["spec"]["predictor"]["model"]["storageUri"] == "s3://out/demo/model"


def test_a_lora_adapter_is_served_by_vllm_on_its_base_model():
    spec = spec_with({"model": "adapter", "args": ["--max-model-len=512"]}, method="lora")
    obj = render_serving(spec, "demo", "ml", MERGED)
    pred = obj["spec"]["predictor"]
    assert pred["storageUris"] == [
        {"uri": "s3://models/tiny", "mountPath": BASE_DIR},
        {"uri": "s3://out/demo/adapter", "mountPath": ADAPTER_DIR},
    ]
    assert "storageUri" not in pred["model"]
    assert pred["model"]["args"] == [
        f"--model_dir={BASE_DIR}",
        "--enable-lora",
        "--lora-modules",
        f"demo={ADAPTER_DIR}",
        "--max-model-len=512",
    ]


def test_auto_serves_the_adapter_when_the_job_writes_no_merged_weights():
    spec = spec_with({}, output={"uri": "s3://out/demo", "mergeAdapter": False})
    obj = render_serving(spec, "demo", "ml", {"adapter": "s3://out/demo/adapter/"})
    assert "--enable-lora" in obj["spec"]["predictor"]["model"]["args"]


def test_deployment_runs_the_users_image_with_the_model_location_and_s3_settings():
    spec = spec_with(
        {
            "kind": "Deployment",
            "image": "vllm/vllm-openai:v0.11.0",
            "name": "demo-llm",
            "gpus": 1,
            "args": ["--model", "$(KUBETUNE_MODEL_URI)"],
            "replicas": 2,
        }
    )
    obj = render_serving(spec, "demo", "ml", MERGED)
    assert (
        obj["kind"] == "Deployment" and obj["metadata"]["name"] == "demo-llm" and obj["spec"]["replicas"] == 2
    )
    pod = obj["spec"]["template"]
    assert obj["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "kubetune.io/job-name" not in pod["metadata"]["labels"]  # not the training gang
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["KUBETUNE_MODEL_URI"] == "s3://out/demo/model"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert c["image"] == "vllm/vllm-openai:v0.11.0" and c["args"] == ["--model", "$(KUBETUNE_MODEL_URI)"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_deployment_reads_s3_with_the_same_settings_as_the_trainer_session_token_included():
    storage = {
        **BASE["spec"]["storage"],
        "secretRef": {**BASE["spec"]["storage"]["secretRef"], "sessionTokenKey": "TOKEN"},
    }
    spec = spec_with({"kind": "Deployment", "image": "srv:1"}, storage=storage)
    env = render_serving(spec, "demo", "ml", MERGED)["spec"]["template"]["spec"]["containers"][0]["env"]
    trainer = [e for e in render_pod_template(spec, "demo", 0)["spec"]["containers"][0]["env"]
               if e["name"].startswith("AWS_")]  # fmt: skip
    assert trainer and trainer == [e for e in env if e["name"].startswith("AWS_")]
    assert {
        "name": "AWS_SESSION_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "TOKEN"}},
    } in env


@pytest.mark.parametrize(
    ("serving", "overrides", "field"),
    [
        ({"kind": "Deployment"}, {}, "spec.serving.image: is required with kind: Deployment"),
        (
            {"model": "adapter"},
            {"method": "full"},
            "spec.serving.model: adapter is served with vLLM's --enable-lora",
        ),
        (
            {"model": "merged"},
            {"output": {"uri": "s3://out/demo", "mergeAdapter": False}},
            "spec.serving.model: merged, but the job writes no merged weights",
        ),
        ({}, {"output": {"uri": "/tmp/out"}}, "spec.output.uri: /tmp/out cannot be read by serving pods"),
        (
            {"model": "adapter"},
            {"model": {"source": "/models/tiny"}},
            "spec.model.source: /models/tiny: the InferenceService loads the base model",
        ),
        ({}, {"method": "prompt_tuning"}, "spec.serving: a prompt_tuning adapter has no merged weights"),
        ({"name": "Bad_Name"}, {}, "spec.serving.name"),
    ],
)
def test_a_serving_spec_that_cannot_work_is_refused_naming_the_field_and_fix(serving, overrides, field):
    found = problems(serving, **overrides)
    assert any(p.startswith(field) for p in found), found


def test_status_records_the_created_object_once_then_nothing_is_left_to_do():
    obj = render_serving(spec_with({}), "demo", "ml", MERGED)
    status = FineTuneJobStatus(phase="Succeeded")
    assert not s.handed_off(status, obj)
    new, event = s.record(status, obj, "created", NOW, 1)
    assert new.serving == ServingStatus(kind="InferenceService", name="demo", uri="s3://out/demo/model")
    assert new.to_patch()["serving"] == {
        "kind": "InferenceService",
        "name": "demo",
        "uri": "s3://out/demo/model",
    }
    assert event is not None and event[:2] == ("Normal", "ServingCreated")
    assert s.handed_off(new, obj)
    again, event = s.record(new, obj, "created", NOW, 1)
    assert event is None and again == new


def test_a_missing_inferenceservice_api_is_a_condition_not_a_crash():
    obj = render_serving(spec_with({}), "demo", "ml", MERGED)
    new, event = s.record(FineTuneJobStatus(phase="Succeeded"), obj, "missing", NOW, 1)
    cond = next(c for c in new.conditions if c.type == "Serving")
    assert cond.status == "False" and cond.reason == "ServingAPIMissing"
    assert "install KServe" in cond.message and "serving.kserve.io/v1beta1" in cond.message
    assert new.serving is None and new.phase == "Succeeded"
    assert event is not None and event[0] == "Warning"


@pytest.mark.parametrize("phase", ["Failed", "Running", "Pending"])
def test_only_a_succeeded_job_is_handed_to_serving(phase):
    body = {"metadata": {"name": "demo", "namespace": "ml", "uid": "u1", "generation": 1}}
    status = FineTuneJobStatus(phase=phase, artifacts={"mergedModel": "s3://out/demo/model/"})
    kube = FakeCluster()
    assert hand_off(body, spec_with({}), status, kube) is None
    assert kube.requests == []  # returns before any API call


def test_a_name_taken_by_an_object_the_job_does_not_own_is_reported_not_taken_over():
    obj = render_serving(spec_with({}), "demo", "ml", MERGED)
    new, event = s.record(FineTuneJobStatus(phase="Succeeded"), obj, "taken", NOW, 1)
    cond = next(c for c in new.conditions if c.type == "Serving")
    assert (cond.status, cond.reason) == ("False", "ServingNameTaken") and "spec.serving.name" in cond.message
    assert event is not None and event[0] == "Warning" and new.serving is None


def test_kubetune_render_shows_what_serves_the_job_once_it_succeeds(tmp_path, capsys):
    import yaml
    from kubetune.cli.main import main

    doc = {**BASE, "spec": {**BASE["spec"], "serving": {"kind": "InferenceService"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", str(path)]) == 0
    objs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job", "InferenceService"]
    assert objs[-1]["spec"]["predictor"]["model"]["storageUri"] == "s3://out/demo/model"
