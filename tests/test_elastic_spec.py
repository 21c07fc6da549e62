"""spec.distributed.minNodes: the node counts an elastic gang may train at, the accumulation at each, the trainer
config of a shrunk gang, and the bad input refused by `kubetune validate` and the CRD's CEL, naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetune.api import elastic
from kubetune.api.crd import crd
from kubetune.api.validation import validate_manifest
from kubetune.render.trainer_config import render_trainer_config
from operator_samples import manifest, spec

DDP = {"backend": "ddp"}


def problems(**overrides):  # type: ignore[no-untyped-def]
    return [str(p) for p in validate_manifest(manifest(**overrides))[1]]


def test_a_shrunk_gang_keeps_the_global_batch_with_more_accumulation() -> None:
    s = spec(
        distributed={"nodes": 3, "minNodes": 2, **DDP},
        training={"perDeviceBatchSize": 2, "globalBatchSize": 12},
    )
    assert elastic.node_counts(s) == [3, 2]
    whole, shrunk = render_trainer_config(s, "j"), render_trainer_config(s, "j", nodes=2)
    assert (whole.world_size, whole.gradient_accumulation_steps) == (3, 2)
    assert (shrunk.world_size, shrunk.gradient_accumulation_steps) == (2, 3)
    assert shrunk.spec == whole.spec  # the spec (what a checkpoint records as trained) is the same


def test_without_a_global_batch_the_whole_gangs_batch_is_kept() -> None:
    s = spec(
        distributed={"nodes": 4, "minNodes": 1, "procsPerNode": 2, **DDP}, training={"perDeviceBatchSize": 3}
    )
    assert elastic.global_batch(s) == 24
    assert elastic.node_counts(s) == [4, 2, 1]  # 3 nodes x 2 x 3 = 18 does not divide 24: never used
    assert [elastic.nodes_for(s, n) for n in (5, 4, 3, 2, 1, 0)] == [4, 4, 2, 2, 1, None]
    assert render_trainer_config(s, "j", nodes=2).gradient_accumulation_steps == 2


def test_a_fixed_size_gang_renders_as_before() -> None:
    s = spec(distributed={"nodes": 2, **DDP}, training={"perDeviceBatchSize": 4})
    assert elastic.node_counts(s) == [2]
    config = render_trainer_config(s, "j")
    assert (config.world_size, config.gradient_accumulation_steps) == (2, 1)


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.integers(1, 16),
    low=st.integers(1, 16),
    per_device=st.integers(1, 4),
    procs=st.integers(1, 4),
    steps=st.integers(1, 6),
)
def test_every_allowed_count_keeps_the_global_batch_exactly(
    nodes: int, low: int, per_device: int, procs: int, steps: int
) -> None:
    gbs = per_device * procs * nodes * steps
    s = spec(distributed={"nodes": nodes, "minNodes": min(low, nodes), "procsPerNode": procs, **DDP},
             training={"perDeviceBatchSize": per_device, "globalBatchSize": gbs})  # fmt: skip
    counts = elastic.node_counts(s)
    assert counts[0] == nodes and counts == sorted(counts, reverse=True) and min(counts) >= min(low, nodes)
    for n in counts:
        assert per_device * n * procs * elastic.accumulation(s, n) == gbs
    for placeable in range(0, nodes + 2):
        chosen = elastic.nodes_for(s, placeable)
        assert chosen is None or (chosen <= placeable and chosen in counts)
        assert (chosen is None) == (placeable < min(counts))


@pytest.mark.parametrize(
    "distributed, training, wanted",
    [
        ({"nodes": 3, "minNodes": 4, **DDP}, {"globalBatchSize": 6}, "spec.distributed.minNodes: cannot exceed distributed.nodes (3; got 4)"),
        ({"nodes": 3, "minNodes": 0, **DDP}, {}, "spec.distributed.minNodes: must be >= 1 (got 0)"),
        ({"nodes": 3, "minNodes": 2, "backend": "deepspeed", "zeroStage": 3, "offloadParams": True, "gpusPerNode": 1},
         {"globalBatchSize": 6}, "spec.distributed.minNodes: elastic resume loads checkpoints at another world size"),
        ({"nodes": 3, "minNodes": 2, "offloadOptimizer": True}, {"globalBatchSize": 6},
         "spec.distributed.minNodes: elastic resume loads checkpoints"),
        ({"nodes": 3, "minNodes": 2, **DDP}, {}, "spec.distributed.minNodes: the gang can never shrink: the global batch of 3"),
    ],
)  # fmt: skip
def test_bad_min_nodes_is_refused_naming_the_field(distributed: dict, training: dict, wanted: str) -> None:
    found = problems(distributed=distributed, training=training)
    assert any(p.startswith(wanted) for p in found), found


def test_a_good_elastic_spec_has_no_problems() -> None:
    assert problems(distributed={"nodes": 3, "minNodes": 2, **DDP}, training={"globalBatchSize": 6}) == []
    for stage in (1, 2, 3):  # ZeRO checkpoints reshard through DeepSpeed's universal checkpoint
        gpu = {"nodes": 3, "minNodes": 2, "gpusPerNode": 1, "zeroStage": stage}
        assert problems(distributed={**gpu, "backend": "deepspeed"}, training={"globalBatchSize": 6}) == []
        assert problems(distributed={**gpu, "backend": "auto"}, training={"globalBatchSize": 6}) == []


def test_the_crd_refuses_min_nodes_above_nodes_and_an_unreshardable_backend_in_cel() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["rule"]: r["message"] for r in schema["x-kubernetes-validations"]}
    assert rules[
        "!has(self.distributed.minNodes) || self.distributed.minNodes <= self.distributed.nodes"
    ].startswith("spec.distributed.minNodes: cannot exceed distributed.nodes")
    reshard = next(
        m
        for r, m in rules.items()
        if r.startswith("!has(self.distributed.minNodes) || self.distributed.backend")
    )
    assert reshard.startswith("spec.distributed.minNodes: elastic resume")
    assert schema["properties"]["distributed"]["properties"]["minNodes"]["minimum"] == 1


def test_the_pod_group_of_an_elastic_gang_admits_its_smallest_size() -> None:
    from kubetune.render.gang import min_member

    gang = {"gang": {"scheduler": "coscheduling"}}
    assert min_member(spec(distributed={"nodes": 3, "minNodes": 2, **DDP}, scheduling=gang)) == 2
    assert min_member(spec(distributed={"nodes": 3, **DDP}, scheduling=gang)) == 3
    pinned = {"gang": {"scheduler": "coscheduling", "minMember": 3}}
    assert min_member(spec(distributed={"nodes": 3, "minNodes": 2, **DDP}, scheduling=pinned)) == 3
