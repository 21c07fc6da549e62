"""spec.scheduling.gang against the API server: the operator creates each scheduler's PodGroup, and the API server
checks it against that project's published CRD (e2e/crds/: scheduler-plugins v0.32.7, Volcano v1.15.1, KAI
v0.12.17). A job whose scheduler's CRD is missing waits with a Warning naming the CRD and no Job, and goes on
once the CRD is installed. examples/gang-scheduling.yaml is what is applied, pointed at the harness's data.

The jobs are created suspended: no scheduler other than kube-scheduler runs here, and these checks are about
the objects, not about placement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, Kctl, job_doc, wait_for

pytestmark = [pytest.mark.e2e]
NS_KEY = "queue"
CRDS = ROOT / "e2e" / "crds"
EXAMPLE = ROOT / "examples" / "gang-scheduling.yaml"
CRD_NAMES = {"coscheduling": "podgroups.scheduling.x-k8s.io", "volcano": "podgroups.scheduling.volcano.sh",
             "kai": "podgroups.scheduling.run.ai"}  # fmt: skip


def example_jobs(s3: Any, s3_data: dict[str, str]) -> dict[str, dict[str, Any]]:
    """examples/gang-scheduling.yaml's jobs, their data pointed at the harness's S3 and sized for it, suspended."""
    out = {}
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        name = doc["metadata"]["name"]
        job = job_doc(name, s3, s3_data, steps=5, checkpoint_steps=5, **{"runPolicy.suspend": True})
        job["spec"]["scheduling"] = doc["spec"]["scheduling"]
        out[doc["spec"]["scheduling"]["gang"]["scheduler"]] = job
    return out


def events(kctl: Kctl, ns: str, name: str) -> list[dict[str, Any]]:
    r = kctl(
        "-n", ns, "get", "events", f"--field-selector=involvedObject.name={name}", "-o", "json", check=False
    )
    return json.loads(r.stdout)["items"] if r.returncode == 0 else []


def pod_group(kctl: Kctl, ns: str, api_group: str, name: str) -> dict[str, Any] | None:
    r = kctl("-n", ns, "get", f"podgroups.{api_group}", name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def install(kctl: Kctl, path: Path, crd: str) -> None:
    r = kctl("apply", "--server-side", "--force-conflicts", "-f", str(path), check=False)
    assert r.returncode == 0, r.stderr
    kctl.wait_established(crd)


def test_pod_groups_of_each_scheduler_are_accepted_by_its_crd(kctl, suite_ns, s3, s3_data):
    jobs = example_jobs(s3, s3_data)
    # Volcano's CRD is not installed yet: a Warning naming it, PodGroupReady=False, and no Job.
    if kctl("get", "crd", CRD_NAMES["volcano"], check=False).returncode == 0:
        pytest.skip("Volcano's PodGroup CRD is already installed in this cluster")
    kctl.apply(suite_ns, jobs["volcano"])

    def missing() -> bool:
        conds = {c["type"]: c for c in kctl.status(suite_ns, "gang-volcano").get("conditions") or []}
        return conds.get("PodGroupReady", {}).get("reason") == "PodGroupCRDMissing"

    wait_for("PodGroupCRDMissing", missing, 60, 1)
    conds = {c["type"]: c for c in kctl.status(suite_ns, "gang-volcano")["conditions"]}
    assert CRD_NAMES["volcano"] in conds["PodGroupReady"]["message"]
    assert kctl.phase(suite_ns, "gang-volcano") == "Pending"
    warnings = [e for e in events(kctl, suite_ns, "gang-volcano") if e["reason"] == "PodGroupCRDMissing"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert kctl.get(suite_ns, "jobs", None, "-l=kubetune.io/job-name=gang-volcano") == []

    for scheduler, crd in CRD_NAMES.items():
        install(kctl, next((CRDS / scheduler).glob("*.yaml")), crd)
    for scheduler in ("coscheduling", "kai"):
        kctl.apply(suite_ns, jobs[scheduler])

    expected = {"coscheduling": ("scheduling.x-k8s.io", "scheduler-plugins-scheduler"),
                "volcano": ("scheduling.volcano.sh", "volcano"), "kai": ("scheduling.run.ai", "kai-scheduler")}  # fmt: skip
    for scheduler, (api_group, scheduler_name) in expected.items():
        name = f"gang-{scheduler}"
        # Volcano's job looks again on its own (every 30 s) now that the CRD exists.
        wait_for(f"{name}'s Job", lambda n=name: kctl.get(suite_ns, "jobs", f"{n}-r0") is not None, 90, 1)
        group = pod_group(kctl, suite_ns, api_group, name)
        assert group is not None, f"no PodGroup {name} in {api_group}"
        assert group["spec"]["minMember"] == 2
        assert group["metadata"]["ownerReferences"][0]["name"] == name
        template = kctl.get(suite_ns, "jobs", f"{name}-r0")["spec"]["template"]
        assert template["spec"]["schedulerName"] == scheduler_name
        if scheduler == "coscheduling":
            assert template["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == name
            assert group["spec"]["scheduleTimeoutSeconds"] == 300
            assert group["spec"]["minResources"]["cpu"] == "200m"  # 2 pods x 100m
        elif scheduler == "volcano":
            assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == name
            assert group["spec"]["queue"] == "research"
        else:
            assert template["metadata"]["annotations"]["pod-group-name"] == name
            assert template["metadata"]["labels"]["kai.scheduler/queue"] == "team-a"
            assert group["spec"]["queue"] == "team-a"
        wait_for(f"{name} PodGroupReady", lambda n=name: gang_ready(kctl, suite_ns, n), 30, 1)


def gang_ready(kctl: Kctl, ns: str, name: str) -> bool:
    conds = {c["type"]: c for c in kctl.status(ns, name).get("conditions") or []}
    return conds.get("PodGroupReady", {}).get("status") == "True"
