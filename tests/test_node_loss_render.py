"""The gang's placement on many nodes: node-loss tolerations and one pod per node (distributed.spread)."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.models import FineTuneJob
from kubetune.api.validation import validate_manifest
from kubetune.render.objects import render_all
from kubetune.status.runs import trained_hash


def job(**distributed: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "mn"},
        "spec": {
            "model": {"source": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "chat"},
            "method": "lora",
            "distributed": {"nodes": 3, "procsPerNode": 1, **distributed},
            "output": {"uri": "s3://out/mn"},
        },
    }


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = FineTuneJob.model_validate(doc).spec
    workload = next(o for o in render_all(spec, "mn", "ns", "uid") if o["kind"] == "Job")
    return workload["spec"]["template"]["spec"]


def test_gang_tolerates_node_loss_for_the_configured_time() -> None:
    tolerations = pod_spec(job())["tolerations"]
    assert {t["key"]: t["tolerationSeconds"] for t in tolerations} == {
        "node.kubernetes.io/not-ready": 60,
        "node.kubernetes.io/unreachable": 60,
    }
    assert all(t["effect"] == "NoExecute" and t["operator"] == "Exists" for t in tolerations)
    tolerations = pod_spec(job(nodeLossTolerationSeconds=120))["tolerations"]
    assert {t["tolerationSeconds"] for t in tolerations} == {120}


def test_a_users_own_node_loss_toleration_wins() -> None:
    doc = job()
    mine = {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 900,
    }
    doc["spec"]["tolerations"] = [
        mine,
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    tolerations = pod_spec(doc)["tolerations"]
    assert [t for t in tolerations if t["key"] == "node.kubernetes.io/unreachable"] == [mine]
    assert {t["key"] for t in tolerations} == {
        "node.kubernetes.io/unreachable",
        "nvidia.com/gpu",
        "node.kubernetes.io/not-ready",
    }


def test_a_tolerate_everything_toleration_is_not_cut_short() -> None:
    doc = job()
    doc["spec"]["tolerations"] = [{"operator": "Exists"}]
    assert pod_spec(doc)["tolerations"] == [{"operator": "Exists"}]


def test_gang_spreads_one_pod_per_node_counting_only_this_job() -> None:
    """The job's pods only: the scheduler counts no terminating or finished pod, and a restarted gang is released
    once the earlier generation is gone (the template, shared by every generation, cannot name one)."""
    (constraint,) = pod_spec(job())["topologySpreadConstraints"]
    assert constraint == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
        "nodeTaintsPolicy": "Honor",
        "labelSelector": {"matchLabels": {"kubetune.io/job-name": "mn"}},
    }
    assert "topologySpreadConstraints" not in pod_spec(job(spread="none"))
    assert "topologySpreadConstraints" not in pod_spec(job(nodes=1))


@pytest.mark.parametrize(
    ("distributed", "field", "needle"),
    [
        ({"nodeLossTolerationSeconds": 10}, "spec.distributed.nodeLossTolerationSeconds", "30"),
        ({"nodeLossTolerationSeconds": 7200}, "spec.distributed.nodeLossTolerationSeconds", "3600"),
        ({"spread": "zones"}, "spec.distributed.spread", "nodes"),
    ],
)
def test_bad_placement_is_refused_naming_the_field_and_the_bound(
    distributed: dict[str, Any], field: str, needle: str
) -> None:
    problems = validate_manifest(job(**distributed))
    assert problems, distributed
    text = "\n".join(map(str, problems))
    assert field in text and needle in text, text


def test_placement_edits_are_not_a_new_run() -> None:
    before = trained_hash(FineTuneJob.model_validate(job()).spec)
    assert (
        trained_hash(FineTuneJob.model_validate(job(spread="none", nodeLossTolerationSeconds=300)).spec)
        == before
    )
    assert trained_hash(FineTuneJob.model_validate(job(nodes=2)).spec) != before
