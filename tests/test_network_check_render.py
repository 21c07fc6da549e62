"""The network check's spec field, the probe in the pod's command, and rank 0's report in status.network."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.contract import ENV_POD_NAME, REASONS, ExitCode, is_retryable
from kubetune.api.models import FineTuneJob
from kubetune.api.trainer_config import resume_fields
from kubetune.api.validation import validate_manifest
from kubetune.render.objects import render_all
from kubetune.status.progress import STATUS_PAIRS, to_progress
from kubetune.status.runs import trained_hash


def job(nodes: int = 2, **check: Any) -> dict[str, Any]:
    distributed: dict[str, Any] = {"nodes": nodes, "procsPerNode": 1}
    if check:
        distributed["networkCheck"] = check
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "nc"},
        "spec": {
            "model": {"source": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "chat"},
            "method": "lora",
            "distributed": distributed,
            "output": {"uri": "s3://out/nc"},
        },
    }


def container(doc: dict[str, Any]) -> dict[str, Any]:
    objects = render_all(FineTuneJob.model_validate(doc).spec, "nc", "ml", uid="u")
    [workload] = [o for o in objects if o["kind"] == "Job"]
    return dict(workload["spec"]["template"]["spec"]["containers"][0])


def test_several_pods_probe_rank_zeros_rendezvous_port_before_torchrun() -> None:
    c = container(job(timeoutSeconds=45))
    assert c["command"] == ["python", "-m", "kubetune_trainer.reach"]
    assert c["args"][:4] == ["--timeout-seconds", "45", "--", "torchrun"]
    assert "--master-addr nc-r0-0.nc --master-port 29500" in " ".join(c["args"])
    assert {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]


def test_one_pod_or_the_check_off_runs_plain_torchrun() -> None:
    for doc in (job(nodes=1), job(enabled=False)):
        c = container(doc)
        assert c["command"] == ["torchrun"] and c["args"][0] == "--nnodes"


def test_the_pods_carry_the_labels_the_charts_network_policy_selects() -> None:
    objects = render_all(FineTuneJob.model_validate(job()).spec, "nc", "ml", uid="u")
    [workload] = [o for o in objects if o["kind"] == "Job"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert {
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.io/role": "worker",
    }.items() <= labels.items()


@pytest.mark.parametrize(
    ("check", "field", "needle"),
    [
        ({"timeoutSeconds": 2}, "spec.distributed.networkCheck.timeoutSeconds", "5"),
        ({"megabytes": 0}, "spec.distributed.networkCheck.megabytes", "1"),
        ({"megabytes": 4096}, "spec.distributed.networkCheck.megabytes", "1024"),
        ({"enabled": "sometimes"}, "spec.distributed.networkCheck.enabled", "true or false"),
    ],
)
def test_bad_check_settings_are_refused_naming_the_field(
    check: dict[str, Any], field: str, needle: str
) -> None:
    problems = validate_manifest(job(**check))
    text = "\n".join(map(str, problems))
    assert field in text and needle in text, text


def test_the_check_is_neither_a_new_run_nor_a_resume_change() -> None:
    before = FineTuneJob.model_validate(job()).spec
    after = FineTuneJob.model_validate(job(enabled=False, megabytes=64)).spec
    assert trained_hash(before) == trained_hash(after)
    assert resume_fields(before) == resume_fields(after)


def test_network_unreachable_is_its_own_exit_code_and_not_retried() -> None:
    assert REASONS[ExitCode.NETWORK_UNREACHABLE] == "NetworkUnreachable"
    assert not is_retryable(ExitCode.NETWORK_UNREACHABLE)


def test_status_keeps_the_slowest_pairs_of_a_large_gang() -> None:
    pairs = [
        {"source": (r - 1) % 64, "target": r, "latencyMs": 0.1, "bandwidthGbps": 10.0 + r} for r in range(64)
    ]
    data = {"network": {"backend": "nccl", "worldSize": 64, "megabytes": 4, "seconds": 0.4, "pairs": pairs}}
    network = to_progress(data, "2026-03-01T12:00:00Z").network
    assert network is not None and network.world_size == 64
    assert [p.target for p in network.pairs] == list(range(STATUS_PAIRS))  # the slowest, in ring order
    assert to_progress({"network": {"backend": 3}}, "now").network is None  # not a report: dropped


def test_describe_shows_the_network_check_on_one_line() -> None:
    from kubetune.cli.describe import describe

    network = {"backend": "nccl", "worldSize": 16, "megabytes": 4, "allReduceMs": 0.41, "allReduceBusGbps": 18.3,
               "minBandwidthGbps": 11.2, "maxLatencyMs": 0.03, "seconds": 0.2, "checkedAt": "2026-03-01T12:00:00Z"}  # fmt: skip
    doc = {**job(), "status": {"phase": "Running", "network": network}}
    lines = describe(FineTuneJob.model_validate(doc), []).splitlines()
    assert (
        "Network:      nccl, 16 ranks: all-reduce of 4 MB 0.41 ms (18.3 GB/s bus), slowest pair 11.2 GB/s, "
        "highest latency 0.03 ms (checked 2026-03-01T12:00:00Z)"
    ) in lines
