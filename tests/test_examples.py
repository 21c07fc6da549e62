"""Every example manifest validates against the API models, the operator's checks and the CRD schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubetune.api.crd import crd
from kubetune.api.validation import validate_manifest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted(ROOT.glob("examples/*.yaml")) + sorted(ROOT.glob("deploy/kustomize/jobs/finetunejob.yaml"))


def finetunejobs(path: Path) -> list[dict[str, Any]]:
    return [
        d
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict) and d.get("kind") == "FineTuneJob"
    ]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields refused (the API server would prune them silently)."""
    out = {k: (strict(v) if isinstance(v, dict) else v) for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


SCHEMA = strict(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
SCHEMA["properties"]["metadata"] = {"type": "object"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_valid_for_the_models_and_the_operator(path):
    jobs = finetunejobs(path)
    assert jobs, f"{path} holds no FineTuneJob"
    for doc in jobs:
        _, problems = validate_manifest(doc)
        assert [str(p) for p in problems] == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_valid_for_the_crd_schema(path):
    for doc in finetunejobs(path):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def test_crd_schema_check_catches_a_misspelled_field():
    doc = finetunejobs(ROOT / "examples" / "lora-1gpu.yaml")[0]
    doc["spec"]["trainig"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def test_crd_schema_check_catches_a_bound():
    doc = finetunejobs(ROOT / "examples" / "lora-1gpu.yaml")[0]
    doc["spec"]["lora"]["r"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def _references(node: Any, secrets: set[str], claims: set[str]) -> None:
    """The Secrets and PersistentVolumeClaims a manifest reads, wherever in the spec they are named."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                secrets.add(value["name"])
            elif key.endswith("Secret") and isinstance(value, str):  # credentialsSecret, tokenSecret, ...
                secrets.add(value)
            elif key == "claimName":
                claims.add(value)
            else:
                _references(value, secrets, claims)
    elif isinstance(node, list):
        for item in node:
            _references(item, secrets, claims)
    elif isinstance(node, str) and node.startswith("pvc://"):
        claims.add(node[len("pvc://") :].split("/", 1)[0])


def test_every_secret_and_claim_an_example_reads_is_named_in_the_getting_started_guide():
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    missing: dict[str, list[str]] = {}
    for path in sorted(ROOT.glob("examples/*.yaml")):
        for doc in finetunejobs(path):
            secrets: set[str] = set()
            claims: set[str] = set()
            _references(doc["spec"], secrets, claims)
            unnamed = [f"Secret {s}" for s in sorted(secrets) if f"`{s}`" not in guide]
            unnamed += [f"PersistentVolumeClaim {c}" for c in sorted(claims) if f"`{c}`" not in guide]
            if unnamed:
                missing[path.name] = unnamed
    assert not missing, f"docs/getting-started.md does not name what these examples read: {missing}"


def test_trainer_image_paths_are_the_ones_the_operator_sets():
    """The Dockerfile's HF_HOME and KUBETUNE_CACHE_DIR (for `docker run` by hand) are where the pods mount the cache."""
    from kubetune.render.objects import render_all

    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s+(HF_HOME|KUBETUNE_CACHE_DIR)=(\S+)", text, flags=re.M))
    job_doc = finetunejobs(ROOT / "examples" / "lora-1gpu.yaml")[0]
    from kubetune.api.models import FineTuneJob

    job = FineTuneJob.model_validate(job_doc)
    rendered = render_all(job.spec, "j", "ns", "uid", 0)
    pod = next(o for o in rendered if o["kind"] == "Job")["spec"]["template"]["spec"]
    pod_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env == {k: pod_env[k] for k in ("HF_HOME", "KUBETUNE_CACHE_DIR")}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert env["KUBETUNE_CACHE_DIR"] in mounts


def test_crds_directory_applies_as_is():
    """`kubectl apply --server-side -f crds/` reads every .yaml/.yml/.json there: only CustomResourceDefinitions."""
    for path in sorted((ROOT / "crds").iterdir()):
        if path.suffix in (".yaml", ".yml", ".json"):
            kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
            assert kinds == {"CustomResourceDefinition"}, f"{path.name}: {kinds}"
    assert (ROOT / "crds" / "Kustomization").exists()  # what deploy/kustomize/base includes
