"""Every example manifest validates against the API models, the operator's checks and the CRD schema."""

from __future__ import annotations

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
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]


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
