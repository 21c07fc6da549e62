"""Two live FineTuneJobs never write to one output: the later one (creationTimestamp) whose output.uri is the
same as, inside or around a live job's waits (Running=False, OutputInUse, one Warning Event) with no Job
created, and starts once that job has finished. Against the in-memory cluster (tests/fake_cluster.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from fake_cluster import FakeCluster
from kubetune.api.validation import outputs_overlap
from kubetune.controller import reconcile as rec
from kubetune.controller.settings import Settings
from kubetune.controller.store import Store
from kubetune.status import outputs
from operator_samples import manifest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "now", lambda: NOW)


def ftj(name: str, uri: str, created: str, phase: str | None = None) -> dict[str, Any]:
    doc = manifest(output={"uri": uri})
    doc["metadata"] = {
        "name": name,
        "namespace": "ml",
        "uid": f"uid-{name}",
        "generation": 1,
        "creationTimestamp": created,
    }
    if phase:
        doc["status"] = {"phase": phase}
    return doc


def reconcile(kube: FakeCluster, name: str) -> float | None:
    store = Store()
    for obj in kube.of_kind("FineTuneJob"):
        store.put_ftj(obj)
    for obj in kube.of_kind("Job"):
        store.put_child("Job", obj)
    return rec.reconcile(("ml", name), store, Settings(trainer_image="trainer:test"), kube)


@pytest.mark.parametrize("second", ["s3://out/demo", "s3://out/demo/", "s3://out/demo/sub", "s3://out"])
def test_a_second_live_job_on_the_same_output_waits(second: str) -> None:
    kube = FakeCluster(
        ftj("first", "s3://out/demo", "2026-03-01T10:00:00Z", "Running"),
        ftj("second", second, "2026-03-01T11:00:00Z"),
    )

    wake = reconcile(kube, "second")

    assert wake == outputs.OUTPUT_RECHECK_SECONDS
    assert not kube.of_kind("Job")  # nothing trains
    status = kube.get("FineTuneJob", "ml", "second")["status"]  # type: ignore[index]
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (status["phase"], running["status"], running["reason"]) == ("Pending", "False", "OutputInUse")
    assert "FineTuneJob ml/first (s3://out/demo), which is still Running" in running["message"]
    assert "set another spec.output.uri" in running["message"]
    assert [e[1] for e in kube.events()] == ["OutputInUse"]

    reconcile(kube, "second")  # looked again: still waiting, no second Event
    assert [e[1] for e in kube.events()] == ["OutputInUse"] and not kube.of_kind("Job")


def test_the_waiting_job_starts_once_the_first_has_finished() -> None:
    kube = FakeCluster(
        ftj("first", "s3://out/demo", "2026-03-01T10:00:00Z", "Running"),
        ftj("second", "s3://out/demo", "2026-03-01T11:00:00Z"),
    )
    reconcile(kube, "second")
    kube.put({**kube.get("FineTuneJob", "ml", "first"), "status": {"phase": "Succeeded"}})  # type: ignore[dict-item]

    reconcile(kube, "second")

    assert [j["metadata"]["name"] for j in kube.of_kind("Job")] == ["second-r0"]


def test_the_first_job_is_not_held_by_a_later_one_and_distinct_outputs_run_together() -> None:
    kube = FakeCluster(ftj("first", "s3://out/demo", "2026-03-01T10:00:00Z"), ftj("second", "s3://out/demo", "2026-03-01T11:00:00Z"),
                       ftj("other", "s3://out/demo-2", "2026-03-01T09:00:00Z", "Running"))  # fmt: skip
    reconcile(kube, "first")
    assert [j["metadata"]["name"] for j in kube.of_kind("Job")] == ["first-r0"]


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [("s3://out/a", "s3://out/a", True), ("s3://out/a", "s3://out/a/run-2", True), ("s3://out/a", "s3://out/ab", False),
     ("s3://out/a", "pvc://out/a", False), ("pvc://claim/runs/x", "pvc://claim/runs", True), ("file:///r/x", "/r/x", True)],
)  # fmt: skip
def test_outputs_overlap(a: str, b: str, overlap: bool) -> None:
    assert outputs_overlap(a, b) is overlap and outputs_overlap(b, a) is overlap


def test_the_examples_write_to_distinct_outputs() -> None:
    from pathlib import Path

    import yaml

    uris = {}
    for path in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                uris[f"{path.name}:{doc['metadata']['name']}"] = doc["spec"]["output"]["uri"]
    clashes = [(a, b) for a in uris for b in uris if a < b and outputs_overlap(uris[a], uris[b])]
    assert not clashes, clashes
    assert uris["lora-1gpu.yaml:lora-1gpu"] != uris["lora-serve-kserve.yaml:lora-serve"]


def test_a_suspended_job_on_a_held_output_shows_suspended_and_why_it_could_not_start() -> None:
    """What the user asked for (Suspended) and the wait it meets once resumed (OutputInUse), not a Pending job
    that will never start on its own; resumed, it is Pending on the same wait; suspended again and the output
    free, its suspended Job is created."""
    second = ftj("second", "s3://out/demo", "2026-03-01T11:00:00Z")
    second["spec"]["runPolicy"] = {"suspend": True}
    kube = FakeCluster(ftj("first", "s3://out/demo", "2026-03-01T10:00:00Z", "Suspended"), second)

    assert reconcile(kube, "second") == outputs.OUTPUT_RECHECK_SECONDS

    assert not kube.of_kind("Job")
    status = kube.get("FineTuneJob", "ml", "second")["status"]  # type: ignore[index]
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Suspended"
    assert (conds["Suspended"]["status"], conds["Suspended"]["reason"]) == ("True", "JobSuspended")
    assert (conds["Running"]["status"], conds["Running"]["reason"]) == ("False", "OutputInUse")
    assert "FineTuneJob ml/first (s3://out/demo), which is still Suspended" in status["message"]
    assert "cannot start before that one finishes" in status["message"]
    assert [e[1] for e in kube.events()] == ["OutputInUse"]

    resumed = kube.get("FineTuneJob", "ml", "second")
    resumed["spec"]["runPolicy"] = {"suspend": False}  # type: ignore[index]
    kube.put(resumed)  # type: ignore[arg-type]
    reconcile(kube, "second")
    status = kube.get("FineTuneJob", "ml", "second")["status"]  # type: ignore[index]
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending" and not kube.of_kind("Job")
    assert (conds["Suspended"]["status"], conds["Suspended"]["reason"]) == ("False", "JobResumed")
    assert conds["Running"]["reason"] == "OutputInUse"

    again = kube.get("FineTuneJob", "ml", "second")
    again["spec"]["runPolicy"] = {"suspend": True}  # type: ignore[index]
    kube.put(again)  # type: ignore[arg-type]
    kube.put({**kube.get("FineTuneJob", "ml", "first"), "status": {"phase": "Succeeded"}})  # type: ignore[dict-item]
    reconcile(kube, "second")
    [job] = kube.of_kind("Job")
    assert job["spec"]["suspend"] is True
    status = kube.get("FineTuneJob", "ml", "second")["status"]  # type: ignore[index]
    assert status["phase"] == "Suspended" and "overlaps" not in status["message"]
