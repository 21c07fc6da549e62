"""Operator-side validation: each problem names the field and the fix."""

from __future__ import annotations

import pytest
from kubetune.api.validation import SpecInvalid, parse_spec, validate_manifest
from operator_samples import manifest


def problems(doc):
    return [str(p) for p in validate_manifest(doc)[1]]


def test_a_good_manifest_has_no_problems():
    assert problems(manifest()) == []


def test_pydantic_bound_is_translated_to_field_and_bound():
    doc = manifest(training={"perDeviceBatchSize": 0})
    assert problems(doc) == ["spec.training.perDeviceBatchSize: must be >= 1 (got 0)"]


def test_unknown_field_names_the_field():
    doc = manifest(training={"lernRate": 1})
    assert problems(doc) == [
        "spec.training.lernRate: is not a known field (check the spelling and the indentation)"
    ]


def test_missing_required_field():
    doc = manifest()
    del doc["spec"]["output"]
    assert problems(doc) == ["spec.output: is required"]


def test_enum_error_lists_the_choices():
    [problem] = problems(manifest(method="qlora"))
    assert problem.startswith(
        "spec.method: must be one of 'lora', 'dora', 'ia3', 'prompt_tuning', 'prefix_tuning' or 'full'"
    )


def test_lora_block_with_method_full():
    [problem] = problems(manifest(method="full", lora={"r": 8}))
    assert problem.startswith("spec.lora: is only allowed with method: lora")


def test_global_batch_not_a_multiple_suggests_one():
    doc = manifest(training={"perDeviceBatchSize": 2, "globalBatchSize": 10}, distributed={"nodes": 2})
    [problem] = problems(doc)
    assert problem.startswith("spec.training.globalBatchSize: must be a multiple of")
    assert "try 8" in problem


def test_custom_s3_endpoint_without_secret():
    doc = manifest(storage={"endpoint": "http://minio:9000"})
    [problem] = problems(doc)
    assert problem.startswith("spec.storage.secretRef: is required with a custom S3 endpoint")


def test_aws_without_secret_uses_ambient_identity():
    assert problems(manifest(storage={})) == []


def test_invalid_secret_name():
    doc = manifest(storage={"secretRef": {"name": "S3_Creds"}})
    assert problems(doc) == [
        "spec.storage.secretRef.name: 'S3_Creds' is not a valid Secret name (lowercase DNS subdomain)"
    ]


def test_freeze_with_lora_is_refused():
    [problem] = problems(manifest(freeze={"firstNLayers": 2}))
    assert problem.startswith("spec.freeze: applies to method: full")


def test_freeze_with_both_forms_is_refused():
    [problem] = problems(manifest(method="full", freeze={"firstNLayers": 2, "trainableModules": ["q_proj"]}))
    assert "not both" in problem


def test_eval_steps_without_eval_data():
    [problem] = problems(manifest(training={"evalSteps": 10}))
    assert problem.startswith("spec.training.evalSteps: needs evaluation data")


def test_eval_steps_with_eval_split_is_fine():
    assert (
        problems(manifest(training={"evalSteps": 10}, dataset={"train": "/d.jsonl", "evalSplit": 0.1})) == []
    )


def test_deepspeed_on_cpu_is_refused():
    [problem] = problems(manifest(distributed={"backend": "deepspeed"}))
    assert problem.startswith("spec.distributed.backend: deepspeed needs GPUs")


def test_gpu_in_resources_points_to_gpus_per_node():
    [problem] = problems(manifest(resources={"limits": {"nvidia.com/gpu": "1"}}))
    assert "spec.distributed.gpusPerNode" in problem


def test_reserved_env_is_refused():
    assert problems(manifest(env=[{"name": "MASTER_ADDR", "value": "x"}])) == [
        "spec.env[0].name: MASTER_ADDR is set by kubetune; remove it"
    ]


def test_volume_on_reserved_path_is_refused():
    vol = {"name": "cache", "mountPath": "/dev/shm", "source": {"emptyDir": {}}}
    assert problems(manifest(volumes=[vol])) == [
        "spec.volumes[0].mountPath: /dev/shm is used by kubetune; mount elsewhere"
    ]


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"hostPath": {"path": "/data"}}, "spec.volumes[0].source.hostPath"),
        ({"nfs": {"server": "n", "path": "/"}}, "spec.volumes[0].source.nfs"),
    ],
)
def test_a_volume_pod_security_restricted_refuses_is_refused_naming_it(source, field):
    vol = {"name": "data", "mountPath": "/data", "source": source}
    [problem] = problems(manifest(volumes=[vol]))
    assert problem.startswith(f'{field}: a {field.rsplit(".", 1)[1]} volume breaks Pod Security "restricted"')


@pytest.mark.parametrize("key", ["securityContext", "hostNetwork", "privileged", "capabilities", "hostPath"])
def test_privileged_pod_fields_are_refused_with_the_reason(key):
    doc = manifest()
    doc["spec"][key] = {"privileged": True} if key == "securityContext" else True
    assert problems(doc) == [f'spec.{key}: is not a known field: kubetune pods run under Pod Security "restricted" '
                             "(non-root, no privilege or added capabilities, no host namespaces or paths), so the spec has no such field"]  # fmt: skip


def test_a_privileged_serving_context_is_refused_too():
    doc = manifest(
        serving={
            "kind": "Deployment",
            "image": "vllm",
            "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}},
        }
    )
    assert problems(doc)[0].startswith(
        'spec.serving.securityContext: is not a known field: kubetune pods run under Pod Security "restricted"'
    )


@pytest.mark.parametrize(
    ("spec", "problem"),
    [({"shmSize": "32Mi"}, "spec.shmSize: must be between 64Mi and 1Ti (got '32Mi')"),
     ({"shmSize": "2Ti"}, "spec.shmSize: must be between 64Mi and 1Ti (got '2Ti')"),
     ({"scratch": {"size": "500Mi"}}, "spec.scratch.size: must be between 1Gi and 64Ti (got '500Mi')"),
     ({"scratch": {"size": "lots"}}, "spec.scratch.size: has an unsupported form (got 'lots'); expected a Kubernetes quantity such as 8, 500m or 64Gi"),
     ({"terminationGracePeriodSeconds": 5}, "spec.terminationGracePeriodSeconds: must be >= 30 (got 5)"),
     ({"serving": {"kind": "Deployment", "image": "vllm", "runAsUser": 0}}, "spec.serving.runAsUser: must be >= 1 (got 0)")],
)  # fmt: skip
def test_pod_sizes_are_bounded(spec, problem):
    assert problems(manifest(**spec)) == [problem]


def test_pod_sizes_within_bounds_are_fine():
    assert (
        problems(
            manifest(
                shmSize="64Gi",
                scratch={"size": "2Ti", "storageClassName": "nvme"},
                terminationGracePeriodSeconds=3600,
            )
        )
        == []
    )


def test_long_name_is_refused():
    doc = manifest()
    doc["metadata"]["name"] = "x" * 51
    assert problems(doc) == ["metadata.name: must be at most 50 characters (got 51); pods are named after it"]


def test_name_must_start_with_a_letter():
    doc = manifest()
    doc["metadata"]["name"] = "1job"
    [problem] = problems(doc)
    assert problem.startswith("metadata.name: '1job' must start with a lowercase letter")


def test_parse_spec_raises_with_every_problem():
    doc = manifest(training={"evalSteps": 10}, freeze={"firstNLayers": 1})
    with pytest.raises(SpecInvalid) as info:
        parse_spec(doc["spec"], name="demo")
    assert [p.field for p in info.value.problems] == ["spec.freeze", "spec.training.evalSteps"]


def test_parse_spec_prefixes_pydantic_locations_with_spec():
    with pytest.raises(SpecInvalid) as info:
        parse_spec({"model": {"source": "s3://models/x"}, "dataset": {"train": "/d"}}, name="demo")
    assert [str(p) for p in info.value.problems] == ["spec.output: is required"]


def test_the_operator_checks_types_as_strictly_as_the_api_server():
    spec = manifest(
        lora={"r": "16", "alpha": float("inf")}, output={"uri": "s3://out/demo", "mergeAdapter": "false"}
    )["spec"]
    with pytest.raises(SpecInvalid) as exc:
        parse_spec(spec, name="demo")
    assert [str(p) for p in exc.value.problems] == [
        "spec.lora.alpha: must be a finite number (got inf); the API server cannot store .inf or .nan"
    ]
    del spec["lora"]["alpha"]
    with pytest.raises(SpecInvalid) as exc:
        parse_spec(spec, name="demo")
    assert sorted(str(p) for p in exc.value.problems) == [
        "spec.lora.r: must be an integer (got '16')",
        "spec.output.mergeAdapter: must be true or false (got 'false')",
    ]


def test_the_operator_refuses_an_output_inside_the_model():
    spec = manifest(output={"uri": "s3://models/tiny/run1"})["spec"]
    with pytest.raises(SpecInvalid) as exc:
        parse_spec(spec, name="demo")
    assert str(exc.value).startswith(
        "spec.output.uri: s3://models/tiny/run1 overlaps spec.model.source (s3://models/tiny)"
    )


def test_wandb_online_without_an_api_key_secret_names_the_fix():
    doc = manifest(tracking={"wandb": {"project": "p"}})
    assert problems(doc) == [
        "spec.tracking.wandb: mode online needs apiKeySecret (a Secret with the key WANDB_API_KEY); or set mode: offline"
    ]
    assert problems(manifest(tracking={"wandb": {"project": "p", "mode": "offline"}})) == []


def test_tracking_and_hub_secrets_need_valid_names():
    doc = manifest(
        tracking={
            "mlflow": {"uri": "http://mlflow:5000", "experiment": "e", "credentialsSecret": "MLflow_Creds"}
        }
    )
    assert problems(doc) == [
        "spec.tracking.mlflow.credentialsSecret: 'MLflow_Creds' is not a valid Secret name (lowercase DNS subdomain)"
    ]


def test_publish_needs_somewhere_to_publish():
    doc = manifest(output={"uri": "s3://bucket/out", "publish": {}})
    assert problems(doc) == [
        "spec.output.publish: set spec.output.publish.oci, spec.output.publish.huggingface or both"
    ]


def test_the_mlflow_uri_must_be_http():
    doc = manifest(tracking={"mlflow": {"uri": "mlflow.mlops:5000", "experiment": "e"}})
    [problem] = problems(doc)
    assert problem.startswith("spec.tracking.mlflow.uri:")
