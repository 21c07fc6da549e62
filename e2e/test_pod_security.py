"""Pod Security "restricted", enforced by the real API server's PodSecurity admission: every pod kubetune
creates or installs is admitted in a namespace that enforces it, and what validation refuses (a hostPath
volume, a privileged container) the API server refuses there too.

Server-side dry runs, so no node is needed (the pods also run for real in the suite's namespaces, which
enforce "restricted" too: e2e/suite/conftest.py, and e2e/test_kubelet.py for the helm-installed release).

    .venv/bin/pytest e2e/test_pod_security.py -m e2e
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import binaries
from harness.cluster import RESTRICTED, Cluster
from kubetune.api.validation import parse_spec, validate_manifest
from kubetune.render.objects import render_workload
from kubetune.render.serving import render_serving

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
REFUSED = 'violates PodSecurity "restricted:latest"'


@pytest.fixture(scope="module")
def restricted(cluster: Cluster) -> Iterator[str]:
    ns = f"psa-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(ns, RESTRICTED)
    cluster.kubectl(
        "-n", ns, "create", "serviceaccount", "psa-kubetune"
    )  # the chart pods' account (its release's)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def as_pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": template["metadata"].get("labels", {})},
            "spec": template["spec"]}  # fmt: skip


def dry_run(cluster: Cluster, ns: str, pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Create the pod with --dry-run=server: admission (PodSecurity included) runs, nothing is stored."""
    return cluster.kubectl(
        "-n", ns, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
    )


def trainer_spec(**extra: Any) -> Any:
    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    doc["spec"].update(extra)
    return parse_spec(doc["spec"], name="psa")


def chart_pods(namespace: str) -> dict[str, dict[str, Any]]:
    helm = binaries.ensure("helm")["helm"]
    version = binaries.versions()["KUBERNETES_VERSION"]
    out = subprocess.run([str(helm), "template", "psa", str(CHART), "--namespace", namespace, "--kube-version", version,
                          "--set", f"watchNamespaces={{{namespace}}}"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [test_pod] = [d for d in docs if d["kind"] == "Pod"]
    return {"operator": as_pod("operator", deployment["spec"]["template"]), "helm-test": test_pod}


def test_every_pod_kubetune_makes_is_admitted_under_restricted(cluster: Cluster, restricted: str) -> None:
    trainer = render_workload(trainer_spec(), "psa", restricted)["spec"]["template"]
    on_a_class = render_workload(
        trainer_spec(scratch={"size": "100Gi", "storageClassName": "nvme"}), "psa", restricted
    )
    serving = render_serving(trainer_spec(serving={"kind": "Deployment", "image": "registry.example/vllm:v1"}), "psa",
                             restricted, {"mergedModel": "s3://bucket/runs/psa/model/"})  # fmt: skip
    pods = {"trainer": as_pod("trainer", trainer), "trainer-scratch-pvc": as_pod("trainer-pvc", on_a_class["spec"]["template"]),
            "serving": as_pod("serving", serving["spec"]["template"]), **chart_pods(restricted)}  # fmt: skip
    for what, pod in pods.items():
        pod = copy.deepcopy(pod)
        pod["metadata"].pop("namespace", None)
        r = dry_run(cluster, restricted, pod)
        assert r.returncode == 0 and "would violate" not in r.stderr, (what, r.stderr)


def test_what_validation_refuses_the_api_server_refuses_too(cluster: Cluster, restricted: str) -> None:
    """The negative controls: the same namespace refuses a trainer pod with a hostPath volume or a privileged
    container, and kubetune's validation refuses the hostPath one before any pod exists, naming the field."""
    base = as_pod("trainer", render_workload(trainer_spec(), "psa", restricted)["spec"]["template"])
    host = copy.deepcopy(base)
    host["spec"]["volumes"].append({"name": "data", "hostPath": {"path": "/data"}})
    r = dry_run(cluster, restricted, host)
    assert r.returncode != 0 and REFUSED in r.stderr and "hostPath" in r.stderr, r.stderr
    privileged = copy.deepcopy(base)
    privileged["spec"]["containers"][0]["securityContext"] = {
        "privileged": True,
        "capabilities": {"add": ["SYS_ADMIN"]},
    }
    r = dry_run(cluster, restricted, privileged)
    assert r.returncode != 0 and REFUSED in r.stderr and "privileged" in r.stderr, r.stderr

    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    doc["spec"]["volumes"] = [
        {"name": "data", "mountPath": "/data", "source": {"hostPath": {"path": "/data"}}}
    ]
    _, problems = validate_manifest(doc)
    assert [p.field for p in problems] == ["spec.volumes[0].source.hostPath"]
