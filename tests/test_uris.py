"""One list of the URIs a spec names (kubetune.api.uris): validation, the PVC mounts, `kubetune run`, `kubetune
preflight` and the local SDK all walk it, so none of them can skip a field the others see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.crd import object_schema
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.uris import URI_FIELDS, map_uris, resolve_uri, spec_uris
from kubetune.api.validation import parse_spec, pvc_claims
from kubetune.cli.run import localized_document
from kubetune.client.local import resolve_paths
from operator_samples import BASE

SPEC: dict[str, Any] = {
    **BASE["spec"],
    "dataset": {
        "sources": [{"path": "pvc://data/a.jsonl"}, {"path": "/data/b.jsonl"}],
        "eval": "pvc://data/eval.jsonl",
    },
    "evaluation": {"retain": {"train": "pvc://retain/general.jsonl"}},
}


def uri_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every string field of the CRD's schema whose pattern admits a pvc:// or s3:// URI."""
    if schema.get("type") == "string":
        return [path] if "pvc://" in schema.get("pattern", "") or "s3://" in schema.get("pattern", "") else []
    out = []
    for name, sub in (schema.get("properties") or {}).items():
        out += uri_paths(sub, (*path, name))
    if "items" in schema:
        out += uri_paths(schema["items"], (*path, "*"))
    return out


def test_every_uri_field_of_the_api_is_listed():
    found = set(uri_paths(object_schema(FineTuneJobSpec)))
    assert found and found == set(URI_FIELDS), found ^ set(URI_FIELDS)


def test_a_typed_spec_and_its_manifest_name_the_same_uris():
    typed = parse_spec(SPEC, name="demo")
    assert (
        spec_uris(typed)
        == spec_uris(SPEC)
        == {
            "spec.model.source": "s3://models/tiny",
            "spec.dataset.sources[0].path": "pvc://data/a.jsonl",
            "spec.dataset.sources[1].path": "/data/b.jsonl",
            "spec.dataset.eval": "pvc://data/eval.jsonl",
            "spec.evaluation.retain.train": "pvc://retain/general.jsonl",
            "spec.output.uri": "s3://out/demo",
        }
    )


def test_every_pvc_named_anywhere_is_mounted():
    assert pvc_claims(parse_spec(SPEC, name="demo")) == ["data", "retain"]


def test_kubetune_run_preflight_and_the_local_sdk_resolve_every_local_path(tmp_path: Path):
    dataset = {"sources": [{"path": "pvc://data/a.jsonl"}, {"path": "data/b.jsonl"}]}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"},
           "spec": {**SPEC, "dataset": dataset, "evaluation": {"retain": {"sources": [{"path": "retain.jsonl"}]}}}}  # fmt: skip
    expected = f"file://{tmp_path}/data/b.jsonl"
    by_run, _ = localized_document(doc, tmp_path, None, None, [], 0)
    by_sdk = resolve_paths(doc, tmp_path)
    for resolved in (by_run, by_sdk):
        assert resolved["spec"]["dataset"]["sources"][1]["path"] == expected  # the SDK used to skip sources
        assert (
            resolved["spec"]["evaluation"]["retain"]["sources"][0]["path"]
            == f"file://{tmp_path}/retain.jsonl"
        )
        assert resolved["spec"]["model"]["source"] == "s3://models/tiny"


def test_a_field_of_the_wrong_type_is_left_for_validation():
    spec = {"model": {"source": 3}, "dataset": {"sources": "not a list"}, "output": None}
    map_uris(spec, lambda uri: "changed")
    assert spec == {"model": {"source": 3}, "dataset": {"sources": "not a list"}, "output": None}
    assert (
        resolve_uri("/abs/x", Path("/base")) == "file:///abs/x"
        and resolve_uri("hf://o/m", Path("/b")) == "hf://o/m"
    )
