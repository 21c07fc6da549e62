"""GitOps edits of a finished job, applied with `kubectl apply` of the edited manifest as Argo CD does:
an edit that trains nothing new only moves observedGeneration; an edit of what is trained starts run 2,
recorded in status.runs[], written under <uri>/run-2/, resumed from run 1's last checkpoint
(spec.output.resumeFrom: previous), and Argo CD's health check says Progressing until it is done."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import job_doc, wait_for
from sampler import Sampler

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "happy"
LUA = (Path(__file__).resolve().parents[2] / "deploy" / "argocd" / "health-finetunejob.lua").read_text()


def argocd_health(obj: dict[str, Any]) -> str:
    lupa = pytest.importorskip("lupa")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return str(dict(lua.execute(LUA).items())["status"])


def test_edit_after_success_starts_a_resumed_run(cluster, kctl, suite_ns, s3, s3_data, node, operator):
    name = "gitops"
    doc = job_doc(name, s3, s3_data, steps=20, checkpoint_steps=10)
    kctl.apply(suite_ns, doc)
    wait_for("run 1 finished", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 300, 1)
    first = kctl.status(suite_ns, name)
    assert first["phase"] == "Succeeded" and first["progress"]["step"] == 20, first

    # An edit that trains nothing new: no run, but the status now describes generation 2.
    doc["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 3600}
    kctl.apply(suite_ns, doc)
    wait_for(
        "observedGeneration 2", lambda: kctl.status(suite_ns, name).get("observedGeneration") == 2, 60, 0.5
    )
    assert kctl.status(suite_ns, name).get("run", 1) == 1 and kctl.phase(suite_ns, name) == "Succeeded"

    # An edit of what is trained: 10 more steps, continuing from run 1.
    doc["spec"]["training"]["maxSteps"] = 30
    doc["spec"]["output"]["resumeFrom"] = "previous"
    with Sampler(cluster, suite_ns, name, every=0.2) as sampler:
        # The object as the apply wrote it (the API server's answer, before any operator can act): the status
        # still describes generation 2 (Succeeded), so only the generation check makes it Progressing.
        obj = json.loads(kctl("-n", suite_ns, "apply", "-f", "-", "-o", "json", input=json.dumps(doc)).stdout)
        assert obj["metadata"]["generation"] == 3
        assert obj["status"]["phase"] == "Succeeded" and obj["status"]["observedGeneration"] == 2, obj[
            "status"
        ]
        assert argocd_health(obj) == "Progressing"
        wait_for("run 2 started", lambda: kctl.status(suite_ns, name).get("run") == 2, 60, 0.5)
        assert argocd_health(kctl.get(suite_ns, "ftj", name)) == "Progressing"
        wait_for(
            "run 2 finished",
            lambda: (
                kctl.status(suite_ns, name).get("run") == 2
                and kctl.phase(suite_ns, name) in ("Succeeded", "Failed")
            ),
            300,
            1,
        )
    status = kctl.status(suite_ns, name)
    print(f"\n[suite] {name}: phases {sampler.phases} steps {sampler.steps}", file=sys.stderr)
    assert status["phase"] == "Succeeded" and status["observedGeneration"] == 3, status
    assert argocd_health(kctl.get(suite_ns, "ftj", name)) == "Healthy"
    # Run 2 left Succeeded and came back to it. Which phase the samples catch in between depends on timing: the
    # pass that starts run 2 writes Pending and the next one creates its Job (Initializing), often within one
    # 0.2 s sample (a cold CI run saw Succeeded, Initializing, Running, Succeeded).
    between = sampler.phases[1:-1]
    assert between and sampler.phases[-1] == "Succeeded", sampler.phases
    assert set(between) <= {"Pending", "Initializing", "Running"}, sampler.phases

    [run1] = status["runs"]
    base = f"s3://{s3.bucket}/runs/{name}"
    assert run1["run"] == 1 and run1["generation"] == 1 and run1["outcome"] == "Succeeded", run1
    assert run1["uri"] == base and run1["artifacts"]["adapter"].startswith(base + "/adapter"), run1
    assert status["runUri"] == f"{base}/run-2" and status["resumedFrom"] == base, status
    assert all(v.startswith(f"{base}/run-2/") for v in status["artifacts"].values()), status["artifacts"]
    assert status["progress"]["step"] == 30, status["progress"]
    keys = {
        o["Key"]
        for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"runs/{name}/run-2/").get("Contents")
        or []
    }
    assert f"runs/{name}/run-2/COMPLETE" in keys, sorted(keys)[:20]
    # Run 2 started from run 1's last checkpoint (step 20), so it trained 10 steps, not 30.
    rank0 = next(
        p
        for p in kctl.get(suite_ns, "pods", None, f"-l=kubetune.io/job-name={name}")
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    )
    log = node.logs(suite_ns, rank0["metadata"]["name"])
    m = re.search(r"resumed from checkpoint step (\d+) of (\S+)", log)
    assert m and int(m.group(1)) == 20 and m.group(2).rstrip("/") == base, log[-2000:]
    assert all(s >= 20 for s in sampler.steps) and sampler.steps[-1] == 30, sampler.steps
