"""Small FineTuneJob manifests for the operator's unit tests."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.api.models import FineTuneJob, FineTuneJobSpec

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 1},
    "spec": {
        "model": {"source": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/demo"},
        "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "s3-creds"}},
    },
}


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(spec_overrides)
    return doc


def job(**spec_overrides: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(manifest(**spec_overrides))


def spec(**spec_overrides: Any) -> FineTuneJobSpec:
    return job(**spec_overrides).spec
