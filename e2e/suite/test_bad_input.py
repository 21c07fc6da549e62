"""Item 3: malformed FineTuneJobs are refused by `kubectl apply` (CRD schema/CEL, strict field
validation) with the field in the message, or marked Failed by the operator with a SpecValid
condition naming the field; no Job or pod is ever created; the operator stays healthy."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml
from conftest import job_doc, wait_for

pytestmark = pytest.mark.e2e
NS_KEY = "bad"
API, OP = "api", "operator"


def drop(*keys: str) -> dict[str, Any]:
    return {k: None for k in keys}


# (id, overrides on a valid 2x1 CPU LoRA job ("a.b": value, None removes), field named, who refuses)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("wrong-type-int", {"training.maxSteps": "ten"}, "spec.training.maxSteps", API),
    ("wrong-type-float", {"training.learningRate": "fast"}, "spec.training.learningRate", API),
    ("wrong-type-bool", {"output.mergeAdapter": "yes please"}, "spec.output.mergeAdapter", API),
    ("missing-model", {"model": None}, "spec.model", API),
    ("missing-train-data", {"dataset.train": None}, "spec.dataset.train", API),
    ("negative-batch", {"training.perDeviceBatchSize": -4}, "spec.training.perDeviceBatchSize", API),
    ("zero-nodes", {"distributed.nodes": 0}, "spec.distributed.nodes", API),
    ("negative-seq-len", {"dataset.maxSeqLength": -1}, "spec.dataset.maxSeqLength", API),
    ("lora-block-with-full", {"method": "full"}, "spec.lora", API),
    ("unknown-field-typo", {"training.learningrate": 0.1}, "learningrate", API),
    ("unknown-field-top", {"gpus": 8}, "gpus", API),
    ("bad-model-uri", {"model.source": "ftp://models/tiny"}, "spec.model.source", API),
    ("bad-output-uri", {"output.uri": "s3://Bad_Bucket/x"}, "spec.output.uri", API),
    ("bad-train-uri", {"dataset.train": "http://example.com/train.jsonl"}, "spec.dataset.train", API),
    ("global-batch-not-multiple", {"training.globalBatchSize": 10}, "spec.training.globalBatchSize", API),
    ("gpus-not-procs", {"distributed.gpusPerNode": 2}, "spec.distributed.procsPerNode", API),
    ("bad-enum-backend", {"distributed.backend": "horovod"}, "spec.distributed.backend", API),
    ("bad-enum-method", {"method": "qlora", "lora": None}, "spec.method", API),
    ("bad-enum-format", {"dataset.format": "csv"}, "spec.dataset.format", API),
    ("zero-stage-4", {"distributed.zeroStage": 4}, "spec.distributed.zeroStage", API),
    ("offload-params-with-ddp", {"distributed.offloadParams": True}, "spec.distributed.offloadParams", API),
    ("min-nodes-above-nodes", {"distributed.minNodes": 3}, "spec.distributed.minNodes", API),
    ("min-nodes-zero", {"distributed.minNodes": 0}, "spec.distributed.minNodes", API),
    (
        "min-nodes-with-offload",
        {"distributed.minNodes": 1, "distributed.backend": "deepspeed", "distributed.offloadOptimizer": True},
        "spec.distributed.minNodes",
        API,
    ),
    (
        "early-stopping-without-eval",
        {"dataset.eval": None, "training.evalSteps": None, "training.earlyStopping": {"patience": 2}},
        "spec.training.earlyStopping",
        API,
    ),
    (
        "gate-forgetting-without-retain",
        {"evaluation": {"gate": {"maxForgettingPercent": 5}}},
        "spec.evaluation.gate.maxForgettingPercent",
        API,
    ),
    ("select-best-without-mixes", {"output.select": "best"}, "spec.output.select", API),
    (
        "retain-with-eval-split",
        {"evaluation": {"retain": {"train": "/data/r.jsonl", "evalSplit": 0.1}}},
        "spec.evaluation.retain",
        API,
    ),
    ("too-long-name", {}, "metadata.name", API),
    # What the schema cannot check: the operator refuses it (phase Failed, SpecValid=False).
    ("custom-endpoint-without-secret", {"storage.secretRef": None}, "spec.storage.secretRef", OP),
    ("invalid-secret-name", {"storage.secretRef": {"name": "S3_Creds"}}, "spec.storage.secretRef.name", OP),
    (
        "eval-steps-without-eval",
        {"dataset.eval": None, "training.evalSteps": 5},
        "spec.training.evalSteps",
        OP,
    ),
    ("deepspeed-on-cpu", {"distributed.backend": "deepspeed"}, "spec.distributed.backend", OP),
    ("gpu-in-resources", {"resources": {"limits": {"nvidia.com/gpu": "1"}}}, "spec.resources.limits", OP),
    ("reserved-env", {"env": [{"name": "KUBETUNE_PVC_ROOT", "value": "/x"}]}, "spec.env[0].name", OP),
    (
        "reserved-mount",
        {"volumes": [{"name": "cache", "mountPath": "/etc/kubetune", "source": {"emptyDir": {}}}]},
        "spec.volumes[0].mountPath",
        OP,
    ),
    ("freeze-with-lora", {"freeze": {"firstNLayers": 1}}, "spec.freeze", OP),
]


@pytest.mark.parametrize(("case", "overrides", "field", "who"), CASES, ids=[c[0] for c in CASES])
def test_malformed_manifest_is_refused(case, overrides, field, who, kctl, suite_ns, s3, s3_data, operator):
    name = f"bad-{case}"
    if case == "too-long-name":
        name = "bad-" + "x" * 50
    doc = job_doc(name, s3, s3_data, steps=5, **overrides)
    r = kctl.apply(suite_ns, yaml.safe_dump(doc), check=False)
    if who == API:
        assert r.returncode != 0, f"{case}: the API server accepted it\n{r.stdout}"
        assert field in r.stderr, f"{case}: {field!r} not in: {r.stderr}"
        assert kctl.get(suite_ns, "ftj", name) is None
    else:
        assert r.returncode == 0, f"{case}: expected the API server to accept it, got: {r.stderr}"
        wait_for(f"{case} Failed", lambda: kctl.phase(suite_ns, name) == "Failed", 60)
        status = kctl.status(suite_ns, name)
        valid = next(c for c in status["conditions"] if c["type"] == "SpecValid")
        assert valid["status"] == "False" and valid["reason"] == "SpecInvalid", valid
        assert field in valid["message"], valid
        assert field in status.get("message", ""), status
        time.sleep(1.5)  # > one poll interval: nothing is created later either
    assert kctl.get(suite_ns, "jobs") == [], case
    assert kctl.get(suite_ns, "pods") == [], case
    assert kctl.get(suite_ns, "configmaps", f"{name}-config") is None


def test_operator_healthy_after_bad_input(kctl, suite_ns, s3, s3_data, operator):
    """After all of the above the same operator process still serves and handles a valid job."""
    assert operator.healthy()
    doc = job_doc("bad-then-good", s3, s3_data, steps=5, **{"runPolicy.suspend": True})
    kctl.apply(suite_ns, doc)
    wait_for("valid job Suspended", lambda: kctl.phase(suite_ns, "bad-then-good") == "Suspended", 60)
    assert wait_for("its Job", lambda: kctl.get(suite_ns, "job", "bad-then-good-r0"), 30)
    assert not [e for e in operator.errors() if "Traceback" in e], operator.errors()[:3]
