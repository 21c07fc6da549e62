"""spec.output.publish: the spec, its one-line errors, the Secret mount and the reference in status."""

from __future__ import annotations

import json

import pytest
from kubetune.api.contract import ENV_REGISTRY_AUTH, REGISTRY_AUTH_PATH
from kubetune.api.validation import validate_manifest
from kubetune.render.objects import render_workload
from kubetune.status.derive import Observed
from kubetune.status.runs import trained_hash
from operator_samples import manifest, spec
from test_status import job, pod, run

OCI = "127.0.0.1:5000/models/tiny:v1"


def output(**publish):
    return {"uri": "s3://out/demo", "publish": {"oci": OCI, **publish}}


def problems(**spec_overrides):
    return [str(p) for p in validate_manifest(manifest(**spec_overrides))[1]]


def test_a_publish_block_parses_with_its_camel_case_names():
    s = spec(output=output(credentialsSecret="regcred", plainHTTP=True, artifact="adapter"))
    assert s.output.publish is not None
    assert (s.output.publish.credentials_secret, s.output.publish.plain_http, s.output.publish.artifact) == (
        "regcred",
        True,
        "adapter",
    )
    assert problems(output=output(credentialsSecret="regcred")) == []


@pytest.mark.parametrize(
    "reference",
    ["models/tiny:v1", "127.0.0.1:5000/models/tiny", "ghcr.io/Org/model:v1", "ghcr.io/org/model@sha256:abc"],
)
def test_a_reference_without_registry_or_tag_is_refused_with_the_form_expected(reference):
    [problem] = problems(output={"uri": "s3://out/demo", "publish": {"oci": reference}})
    assert problem.startswith(
        f"spec.output.publish.oci: has an unsupported form (got {reference!r}); expected registry/"
    )
    assert "\n" not in problem


@pytest.mark.parametrize(
    "reference", ["ghcr.io/org/model:v1", "localhost:5000/a/b/c:1.0-rc_1", "registry:5000/m:latest"]
)
def test_references_with_a_registry_and_a_tag_are_accepted(reference):
    assert problems(output={"uri": "s3://out/demo", "publish": {"oci": reference}}) == []


def test_an_invalid_secret_name_is_named():
    assert problems(output=output(credentialsSecret="Reg_Cred")) == [
        "spec.output.publish.credentialsSecret: 'Reg_Cred' is not a valid Secret name (lowercase DNS subdomain)"
    ]


def test_publishing_a_model_that_the_job_does_not_write_says_what_to_set():
    [problem] = problems(method="prompt_tuning", output=output(artifact="model"))
    assert problem.startswith("spec.output.publish.artifact: model: method prompt_tuning")
    assert "set artifact: adapter" in problem


def test_publishing_an_adapter_of_a_full_fine_tune_is_refused():
    assert problems(method="full", output=output(artifact="adapter")) == [
        "spec.output.publish.artifact: adapter: method full trains no adapter; set artifact: model or remove it"
    ]


def test_the_secret_is_a_read_only_file_and_only_its_path_is_in_env():
    pod_spec = render_workload(spec(output=output(credentialsSecret="regcred")), "demo", "ml")["spec"][
        "template"
    ]["spec"]
    [volume] = [v for v in pod_spec["volumes"] if v.get("secret", {}).get("secretName") == "regcred"]
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    trainer = pod_spec["containers"][0]
    [mount] = [m for m in trainer["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and REGISTRY_AUTH_PATH.startswith(mount["mountPath"] + "/")
    env = {e["name"]: e for e in trainer["env"]}
    assert env[ENV_REGISTRY_AUTH] == {"name": ENV_REGISTRY_AUTH, "value": REGISTRY_AUTH_PATH}
    assert not any("regcred" in json.dumps(e) for e in trainer["env"])


def test_no_secret_no_mount():
    pod_spec = render_workload(spec(output=output()), "demo", "ml")["spec"]["template"]["spec"]
    assert not [v for v in pod_spec["volumes"] if "secret" in v]
    assert ENV_REGISTRY_AUTH not in {e["name"] for e in pod_spec["containers"][0]["env"]}


def test_publish_settings_are_not_part_of_what_is_trained():
    # An operator upgrade (a new optional field) or a new tag must not retrain a finished job.
    assert trained_hash(spec(output=output())) == trained_hash(spec())


def test_the_digest_pinned_reference_from_rank_0_goes_into_status_artifacts():
    pinned = "127.0.0.1:5000/models/tiny@sha256:" + "ab" * 32
    msg = json.dumps(
        {"exitCode": 0, "reason": "Succeeded", "message": "training finished", "artifacts": {"oci": pinned}}
    )
    rank0 = pod("demo-r0-0", phase="Succeeded", exit_code=0, message=msg)
    d = run(
        Observed(job=job(conditions=["Complete"]), pods=[rank0]), old={"phase": "Running"}, output=output()
    )
    assert d.status.phase == "Succeeded" and d.status.artifacts is not None
    assert d.status.artifacts.oci == pinned
    assert d.status.artifacts.merged_model == "s3://out/demo/model/"
    assert d.status.to_patch()["artifacts"]["oci"] == pinned


def test_without_a_published_reference_status_has_no_oci_artifact():
    msg = json.dumps({"exitCode": 0, "reason": "Succeeded", "message": "training finished"})
    rank0 = pod("demo-r0-0", phase="Succeeded", exit_code=0, message=msg)
    d = run(Observed(job=job(conditions=["Complete"]), pods=[rank0]), old={"phase": "Running"})
    assert d.status.artifacts is not None and d.status.artifacts.oci is None
    assert "oci" not in d.status.to_patch()["artifacts"]
