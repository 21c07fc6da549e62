"""Item 2: `kubectl apply` a 2 nodes x 1 process CPU job (LoRA and full) -> Succeeded, with
progress, artifacts in S3, status.artifacts, Events and the printer columns."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
from conftest import job_doc, wait_for
from sampler import Sampler

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "happy"


def s3_keys(s3: Any, prefix: str) -> set[str]:
    client = s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        keys.update(o["Key"][len(prefix) :] for o in page.get("Contents") or [])
    return keys


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.core), "full"])
def test_happy_path(method, cluster, kctl, suite_ns, s3, s3_data, node, operator):
    name = f"happy-{method}"
    doc = job_doc(name, s3, s3_data, example=method, steps=60, checkpoint_steps=30)
    t0 = time.monotonic()
    with Sampler(cluster, suite_ns, name) as sampler:
        kctl.apply(suite_ns, doc)
        wait_for("Succeeded or Failed", lambda: kctl.phase(suite_ns, name) in ("Succeeded", "Failed"), 300, 1)
        time.sleep(0.5)
    took = time.monotonic() - t0
    status = kctl.status(suite_ns, name)
    print(f"\n[suite] {name}: {took:.1f}s phases={sampler.phases} steps={sampler.steps}", file=sys.stderr)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    # Pending may last less than one sample (the status is written once per change); its Event is checked below.
    assert sampler.saw_in_order("Running", "Succeeded") and sampler.phases[0] in (
        "Pending",
        "Initializing",
    ), sampler.phases
    assert "Failed" not in sampler.phases
    # Progress moved while training, and ends at the last step.
    assert len(set(sampler.steps)) >= 2, sampler.steps
    assert sampler.steps == sorted(sampler.steps), sampler.steps
    assert status["progress"]["step"] == 60 and status["progress"].get("loss") is not None
    # Usage: the gang's pod time (2 nodes, no GPU) and wall time, accrued by the operator (status.usage).
    usage = status["usage"]
    assert usage["wallSeconds"] > 0 and usage["nodeSeconds"] > 0 and usage["gpuSeconds"] == 0, usage
    assert usage["runs"][0]["run"] == 1 and usage["runs"][0]["nodeSeconds"] == usage["nodeSeconds"], usage

    # Artifacts: in S3, sealed (manifest.json, then COMPLETE), and named in status.artifacts.
    prefix = f"runs/{name}/"
    keys = s3_keys(s3, prefix)
    arts = status["artifacts"]
    base = f"s3://{s3.bucket}/{prefix}"
    for field, value in arts.items():
        assert value.startswith(base), (field, value)
        rel = value[len(base) :].rstrip("/")
        assert any(k == rel or k.startswith(rel + "/") for k in keys), (field, value, sorted(keys)[:40])
    expected = {
        "manifest.json",
        "COMPLETE",
        "metrics.json",
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
    }
    if method == "lora":
        assert "adapter" in arts
        expected |= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    assert "mergedModel" in arts and "manifest" in arts
    assert expected <= keys, sorted(keys)
    assert "checkpoints/step-00000030/COMPLETE" in keys, sorted(keys)
    assert "checkpoints/step-00000030/manifest.json" in keys, sorted(keys)
    manifest = json.loads(
        s3.client().get_object(Bucket=s3.bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    assert "model/model.safetensors" in manifest["files"], sorted(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert rel in keys, rel
        assert meta["sha256"] and meta["size"] >= 0

    # Conditions, Events, printer columns, describe.
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["SpecValid"]["status"] == "True"
    events = kctl.get(suite_ns, "events", None, f"--field-selector=involvedObject.name={name}")
    reasons = {e["reason"] for e in events}
    # PodsPending (not yet bound) or, when kube-scheduler binds the pods before the operator's first look
    # at them (the real node: within milliseconds), PodsStarting
    assert "TrainingSucceeded" in reasons and reasons & {"PodsPending", "PodsStarting"}, reasons
    assert len(reasons) >= 2, reasons
    table = kctl("-n", suite_ns, "get", "ftj", name).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:4] == ["NAME", "PHASE", "PROGRESS", "%"] or header[:3] == ["NAME", "PHASE", "PROGRESS"], (
        header
    )
    assert row[0] == name and row[1] == "Succeeded" and row[2] == "100", table
    loss = float(
        row[3]
    )  # the LOSS column: the training loss rank 0 last reported, as status.progress holds it
    assert loss == pytest.approx(float(status["progress"]["loss"]), abs=1e-3), (table, status["progress"])
    wide = kctl("-n", suite_ns, "get", "finetunejob", name, "-o", "wide").stdout
    assert "MESSAGE" in wide.splitlines()[0]
    described = kctl("-n", suite_ns, "describe", "ftj", name).stdout
    assert "TrainingSucceeded" in described and "Events:" in described
    # Pods finished; nothing left running.
    pods = kctl.get(suite_ns, "pods", None, f"-l=kubetune.io/job-name={name}")
    assert pods and all(p["status"]["phase"] == "Succeeded" for p in pods), [
        p["status"]["phase"] for p in pods
    ]
