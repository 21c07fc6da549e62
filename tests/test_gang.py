"""spec.scheduling.gang: the PodGroup each gang scheduler needs, checked against that project's published CRD
(e2e/crds/, copied from its repository at a release), and the refusals of a gang that cannot be."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from kubetune.api.names import LABEL_PRIORITY, LABEL_QUEUE
from kubetune.api.validation import SpecInvalid, parse_spec
from kubetune.render.gang import (
    COSCHEDULING_LABEL,
    FLAVORS,
    KAI_ANNOTATION,
    KAI_QUEUE_LABEL,
    VOLCANO_ANNOTATION,
    scale_quantity,
)
from kubetune.render.objects import render_all

ROOT = Path(__file__).resolve().parents[1]
CRDS = {
    "coscheduling": ROOT / "e2e/crds/coscheduling/scheduling.x-k8s.io_podgroups.yaml",
    "volcano": ROOT / "e2e/crds/volcano/scheduling.volcano.sh_podgroups.yaml",
    "kai": ROOT / "e2e/crds/kai/scheduling.run.ai_podgroups.yaml",
}
QUEUE = {"coscheduling": None, "volcano": "research", "kai": "team-a"}


def spec_doc(**gang: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    spec = doc["spec"]
    spec["resources"] = {"requests": {"cpu": "500m", "memory": "1Gi"}}
    if gang:
        spec["scheduling"] = {"gang": gang}
    return dict(spec)


def rendered(spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    objs = render_all(parse_spec(spec, name="ft"), "ft", "team", labels=labels)
    return {o["kind"]: o for o in objs}


def crd_schema(scheduler: str, api_version: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRDS[scheduler].read_text())
    version = api_version.split("/", 1)[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v["served"], f"{crd['metadata']['name']} does not serve {version}"
            return dict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{crd['metadata']['name']} has no version {version}")


def pruned(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop (not in the structural schema): a PodGroup field the project does not know."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if path == "" and k in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and k in props:
                out += pruned(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += pruned(v, extra, f"{path}.{k}")
            else:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += pruned(v, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("scheduler", sorted(FLAVORS))
def test_pod_group_matches_the_projects_crd(scheduler: str) -> None:
    gang = {"scheduler": scheduler, "scheduleTimeoutSeconds": 120}
    if QUEUE[scheduler]:
        gang["queue"] = QUEUE[scheduler]
    group = rendered(spec_doc(**gang))["PodGroup"]
    schema = crd_schema(scheduler, group["apiVersion"])
    jsonschema.validate(group, schema)  # types, minimums, enums of the published schema
    assert pruned(group, schema) == []
    assert group["spec"]["minMember"] == 2  # default: the whole gang (distributed.nodes)


def test_coscheduling_pod_group_sizes_the_whole_gang_and_its_timeout() -> None:
    objs = rendered(spec_doc(scheduler="coscheduling", scheduleTimeoutSeconds=90))
    # ephemeral-storage: each pod's scratch emptyDir (spec.scratch.size, 20Gi by default)
    assert objs["PodGroup"]["spec"] == {"minMember": 2, "minResources": {"cpu": "1000m", "ephemeral-storage": "40Gi",
                                        "memory": "2Gi"}, "scheduleTimeoutSeconds": 90}  # fmt: skip
    pod = objs["Job"]["spec"]["template"]
    assert pod["metadata"]["labels"][COSCHEDULING_LABEL] == "ft"
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"


def test_min_member_sizes_min_resources() -> None:
    doc = spec_doc(scheduler="volcano", minMember=1)
    assert rendered(doc)["PodGroup"]["spec"] == {"minMember": 1, "minResources": {"cpu": "500m", "ephemeral-storage": "20Gi",
                                                                                  "memory": "1Gi"}}  # fmt: skip


def test_volcano_pods_carry_the_group_annotation_and_scheduler() -> None:
    objs = rendered(spec_doc(scheduler="volcano", queue="research"))
    pod = objs["Job"]["spec"]["template"]
    assert pod["metadata"]["annotations"][VOLCANO_ANNOTATION] == "ft"
    assert pod["spec"]["schedulerName"] == "volcano"
    assert objs["PodGroup"]["spec"]["queue"] == "research"


def test_kai_pods_carry_the_group_annotation_and_queue_label() -> None:
    objs = rendered(spec_doc(scheduler="kai", queue="team-a"))
    pod = objs["Job"]["spec"]["template"]
    assert pod["metadata"]["annotations"][KAI_ANNOTATION] == "ft"
    assert pod["metadata"]["labels"][KAI_QUEUE_LABEL] == "team-a"
    assert pod["spec"]["schedulerName"] == "kai-scheduler"
    assert objs["PodGroup"]["spec"] == {"minMember": 2, "queue": "team-a"}


def test_spec_scheduler_name_overrides_the_flavors_default() -> None:
    doc = spec_doc(scheduler="coscheduling")
    doc["schedulerName"] = "default-scheduler"
    assert rendered(doc)["Job"]["spec"]["template"]["spec"]["schedulerName"] == "default-scheduler"


def test_no_gang_no_pod_group() -> None:
    objs = rendered(spec_doc())
    assert "PodGroup" not in objs
    assert "schedulerName" not in objs["Job"]["spec"]["template"]["spec"]


def test_pod_group_is_created_before_the_job() -> None:
    kinds = [
        o["kind"] for o in render_all(parse_spec(spec_doc(scheduler="coscheduling"), name="ft"), "ft", "team")
    ]
    assert kinds.index("PodGroup") < kinds.index("Job")


def test_kueue_queue_and_priority_labels_reach_the_job() -> None:
    labels = {LABEL_QUEUE: "team-a", LABEL_PRIORITY: "high", "other": "x"}
    job = rendered(spec_doc(), labels)["Job"]
    assert job["metadata"]["labels"][LABEL_QUEUE] == "team-a"
    assert job["metadata"]["labels"][LABEL_PRIORITY] == "high"
    assert "other" not in job["metadata"]["labels"]


@pytest.mark.parametrize(
    ("gang", "field", "says"),
    [
        ({"scheduler": "coscheduling", "minMember": 3}, "spec.scheduling.gang.minMember", "at most 2"),
        (
            {"scheduler": "coscheduling", "scheduleTimeoutSeconds": -1},
            "spec.scheduling.gang.scheduleTimeoutSeconds",
            ">= 0",
        ),
        ({"scheduler": "kai"}, "spec.scheduling.gang.queue", "name the KAI queue"),
        ({"scheduler": "slurm"}, "spec.scheduling.gang.scheduler", "coscheduling"),
    ],
)
def test_a_gang_that_cannot_be_is_refused_naming_the_field(
    gang: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(SpecInvalid) as exc:
        parse_spec(spec_doc(**gang), name="ft")
    problems = {p.field: p.message for p in exc.value.problems}
    assert field in problems, problems
    assert says in problems[field]


def test_the_crd_carries_the_min_member_rule() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert any(m.startswith("spec.scheduling.gang.minMember: cannot exceed") for m in rules)
    timeout = spec["properties"]["scheduling"]["properties"]["gang"]["properties"]["scheduleTimeoutSeconds"]
    assert timeout["minimum"] == 0


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "m", "Ki", "Mi", "Gi", "k", "M"]),
    st.integers(1, 64),
)
def test_scale_quantity_multiplies_in_the_same_unit(value: int, unit: str, times: int) -> None:
    assert scale_quantity(f"{value}{unit}", times) == f"{value * times}{unit}"


def test_scale_quantity_keeps_decimals() -> None:
    assert scale_quantity("0.5", 3) == "1.5"
    assert scale_quantity("1.25Gi", 4) == "5Gi"


def test_pruned_finds_an_unknown_field() -> None:  # the checker above can fail
    group = rendered(spec_doc(scheduler="coscheduling"))["PodGroup"]
    bad = copy.deepcopy(group)
    bad["spec"]["minMembers"] = 2
    assert pruned(bad, crd_schema("coscheduling", group["apiVersion"])) == [".spec.minMembers"]


@pytest.mark.parametrize(
    ("gang", "says"),
    [
        (
            {"scheduler": "coscheduling", "minMember": 5},
            "spec.scheduling.gang.minMember: cannot exceed the gang's 2 pods",
        ),
        (
            {"scheduler": "volcano", "scheduleTimeoutSeconds": -5},
            "spec.scheduling.gang.scheduleTimeoutSeconds: must be >= 0",
        ),
    ],
)
def test_kubetune_validate_refuses_a_gang_that_cannot_be(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gang: dict[str, Any], says: str
) -> None:
    from kubetune.cli.main import main  # noqa: PLC0415

    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    doc["spec"]["scheduling"] = {"gang": gang}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 64
    assert says in capsys.readouterr().err
