"""The FineTuneJob CustomResourceDefinition, generated from the API models.

Pydantic's JSON schema is close to what the API server wants but not the same:
a CRD schema must be *structural* (no $ref, no anyOf/null unions, every node
typed), uses OpenAPI 3.0's boolean `exclusiveMinimum`, and only applies nested
defaults when the parent object exists (so defaulted objects default to `{}`).
`crd()` does that translation; `kubetune crd` prints it and crds/ holds a copy.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Union

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kubetune import __version__
from kubetune.api import models
from kubetune.api.models import TRAINED_FIELDS, FineTuneJobSpec, FineTuneJobStatus

ACTIVE_PHASES: tuple[str, ...] = ("Initializing", "Running", "Restarting")

# Keys pydantic emits that a CRD schema does not take.
_DROP = {"title", "$defs", "$schema"}


# Children are named `<name>-r<restart>-<index>` (pod hostnames, <= 63 chars): bound the name.
MAX_NAME_LENGTH = 50
NAME_RULE: dict[str, str] = {
    "rule": f"!has(self.metadata.name) || size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (the pods' hostnames add a suffix)",
}


def immutability_rule() -> dict[str, str]:
    """Root-level transition rule: the trained fields (models.TRAINED_FIELDS) are frozen while a gang is active."""
    same = " && ".join(
        f"(has(self.spec.{f}) == has(oldSelf.spec.{f}) && (!has(self.spec.{f}) || self.spec.{f} == oldSelf.spec.{f}))"
        for f in TRAINED_FIELDS
    )
    active = ", ".join(f"'{p}'" for p in ACTIVE_PHASES)
    return {
        "rule": f"!has(oldSelf.status) || !has(oldSelf.status.phase) || !(oldSelf.status.phase in [{active}]) || ({same})",
        "message": (
            "spec." + ", spec.".join(TRAINED_FIELDS) + " cannot change while the job is "
            "Initializing, Running or Restarting; suspend it first (spec.runPolicy.suspend: true) "
            "or create a new FineTuneJob"
        ),
    }


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `annotation` (Optional[M], list[M], M), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _field_default(field: Any) -> Any:
    """The wire default of a pydantic field, or PydanticUndefined when it should carry none."""
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return {}  # the object exists, so its own property defaults apply
        return value if value else PydanticUndefined  # empty lists/maps: leave absent
    if field.default is PydanticUndefined or field.default is None:
        return PydanticUndefined
    return field.default


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs, collapse Optional, and map JSON-Schema idioms to OpenAPI 3.0 / CRD ones."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        node = {**target, **node}  # the field's description wins over the class's
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {branches}")
        branch = branches[0]
        if "$ref" in branch:
            branch = _structural(branch, defs)
        node = {**branch, **node}
        if "$ref" in node:
            return _structural(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
            continue
        out[key] = _structural(value, defs)
    if out.get("additionalProperties") is False or (
        out.get("additionalProperties") is True and "properties" in out
    ):
        del out["additionalProperties"]  # the API server prunes unknown fields itself
    if out.get("additionalProperties") is True:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    if out.get("type") == "string" and "enum" in out and "maxLength" not in out:
        out["maxLength"] = max(len(str(v)) for v in out["enum"])  # bounds CEL cost estimates
    return out


def _apply_model_metadata(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Defaults from default factories (pydantic leaves them out), recursively."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = props.get(alias)
        if prop is None:
            continue
        default = _field_default(field)
        if default is not PydanticUndefined and "default" not in prop:
            prop["default"] = default
        inner = _model_of(field.annotation)
        if inner is None:
            continue
        if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            _apply_model_metadata(prop["items"], inner)
        elif prop.get("type") == "object":
            _apply_model_metadata(prop, inner)


def object_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    _apply_model_metadata(schema, model)
    return schema


def status_schema() -> dict[str, Any]:
    schema = object_schema(FineTuneJobStatus)
    # Kopf may keep its own bookkeeping under status (e.g. status.kopf); keep it.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def openapi_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "FineTuneJob fine-tunes a Hugging Face model on a gang of torchrun pods.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object: kubetune.io/v1alpha1.",
            },
            "kind": {"type": "string", "description": "Kind of this object: FineTuneJob."},
            "metadata": {"type": "object"},  # the API server allows nothing else here
            "spec": object_schema(FineTuneJobSpec),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [NAME_RULE, immutability_rule()],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Current phase"},
    {
        "name": "Progress %",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Steps done, in percent",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.loss",
        "description": "Latest training loss",
    },
    {
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.progress.eta",
        "description": "Estimated time left",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Whole-gang restarts",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{models.PLURAL}.{models.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
                # `kubetune version` reads it to warn about a CRD older or newer than the client
                "app.kubernetes.io/version": __version__,
            },
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": list(models.SHORT_NAMES),
                "categories": ["all", "kubetune", "ml"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `kubetune crd` from kubetune/api/models.py. Do not edit; run `make crd`.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)
