"""The CRD generated from the models: structural, documented, up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubetune.api import TRAINED_FIELDS, FineTuneJobSpec
from kubetune.api.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
CHART_COPY = ROOT / "charts" / "kubetune" / "crds" / "kubetune.io_finetunejobs.yaml"


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def test_checked_in_crd_is_up_to_date():
    assert CHECKED_IN.read_text() == crd_yaml(), "crds/ is stale: run `make crd`"


def test_chart_crd_copy_equals_crds_dir():
    assert CHART_COPY.read_text() == CHECKED_IN.read_text(), (
        "cp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/"
    )


def test_schema_has_no_refs_or_unions():
    text = yaml.safe_dump(schema())
    for word in ("$ref", "anyOf", "oneOf", "allOf", "nullable", "title:"):
        assert word not in text


def test_every_node_is_typed():
    untyped = [p for p, n in walk(schema()) if "type" not in n]
    assert untyped == []


def test_every_field_has_a_description():
    missing = [
        p
        for p, n in walk(schema())
        if p not in ("", ".metadata") and not p.endswith("[]") and not n.get("description")
    ]
    assert missing == []


def test_defaulted_objects_default_to_empty_so_nested_defaults_apply():
    spec = schema()["properties"]["spec"]["properties"]
    for name in ("training", "distributed", "storage", "runPolicy", "resources"):
        assert spec[name]["default"] == {}
    assert spec["training"]["properties"]["learningRate"]["default"] == 2e-4


def test_optional_blocks_have_no_default():
    spec = schema()["properties"]["spec"]["properties"]
    assert "default" not in spec["lora"]
    assert "default" not in spec["freeze"]


def test_exclusive_bounds_use_openapi_v3_booleans():
    alpha = schema()["properties"]["spec"]["properties"]["lora"]["properties"]["alpha"]
    assert alpha["minimum"] == 0 and alpha["exclusiveMinimum"] is True


def test_enums_are_kept():
    method = schema()["properties"]["spec"]["properties"]["method"]
    assert method["enum"] == ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"]


def test_every_string_under_immutable_fields_is_bounded_for_cel_cost():
    spec = schema()["properties"]["spec"]
    unbounded = []
    for field in TRAINED_FIELDS:
        for path, node in walk(spec["properties"][field], field):
            if node.get("type") == "string" and "maxLength" not in node:
                unbounded.append(path)
            if node.get("type") == "array" and "maxItems" not in node:
                unbounded.append(path)
    assert unbounded == []


def test_every_trained_field_is_a_spec_field():
    aliases = {info.alias or name for name, info in FineTuneJobSpec.model_fields.items()}
    assert set(TRAINED_FIELDS) <= aliases


def test_immutability_rule_is_a_root_transition_rule_over_every_training_field():
    rules = schema()["x-kubernetes-validations"]
    rule = next(r["rule"] for r in rules if "oldSelf" in r["rule"])
    for field in TRAINED_FIELDS:
        assert f"oldSelf.spec.{field}" in rule


def test_status_subresource_and_printer_columns():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:6] == ["Phase", "Progress %", "Loss", "ETA", "Restarts", "Age"]


def test_short_name_and_categories():
    names = crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    assert "kubetune" in names["categories"]


def test_conditions_are_a_map_list_keyed_by_type():
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
