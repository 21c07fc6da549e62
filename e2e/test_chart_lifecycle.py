"""Chart-testing's checks on the real node, in namespaces that enforce Pod Security "restricted": install the
previous chart version from the repository's history, upgrade it to the working tree's chart (the operator
rolls and keeps reconciling, `helm test` passes), namespace users with the built-in `edit`/`view` roles get
FineTuneJobs through the aggregated ClusterRoles, and uninstall leaves the CRD and the FineTuneJobs (by design:
deleting a CRD deletes every FineTuneJob; docs/operations/install.md).

    .venv/bin/pytest e2e/test_chart_lifecycle.py -m e2e
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import binaries
from harness.cluster import RESTRICTED, Cluster
from harness.images import chart_images
from harness.mode import NODE_MODE
from harness.waiting import wait_for
from kubetune.api.validation import parse_spec
from kubetune.render.serving import render_serving

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE_MODE != "kubelet", reason="KUBETUNE_E2E_NODE=agent: the chart's pods need the real node"
    ),
]
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
# Apart from the suite's release (kubetune) and test_kubelet's (ktk): its own ClusterRoles and namespaces.
RELEASE, RELEASE_NS, WATCHED = "ct", "ct-system", "ct-jobs"
FULLNAME = f"{RELEASE}-kubetune"


def git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True)


def previous_chart(dest: Path) -> tuple[str, Path]:
    """The last state of the previous chart version in the repository's history (the parent of the commit that
    changed the version to the working tree's), unpacked under `dest`."""
    current = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    for commit in git("log", "--format=%H", "--", "charts/kubetune/Chart.yaml").stdout.decode().split():
        parent = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}^:charts/kubetune/Chart.yaml"], capture_output=True
        )
        if parent.returncode != 0:
            break  # the chart's first commit, or the end of a shallow clone
        version = yaml.safe_load(parent.stdout)["version"]
        if version != current:
            archive = git("archive", f"{commit}^", "charts/kubetune").stdout
            tarfile.open(fileobj=BytesIO(archive)).extractall(dest, filter="data")
            return str(version), dest / "charts" / "kubetune"
    pytest.skip(f"no chart version other than {current} in this clone's history (a shallow clone?)")


def can_i(cluster: Cluster, verb: str, who: str) -> bool:
    r = cluster.kubectl(
        "auth", "can-i", verb, "finetunejobs.kubetune.io", "-n", WATCHED, f"--as={who}", check=False
    )
    return r.stdout.strip() == "yes"


def diagnosis(cluster: Cluster, node: Any, name: str) -> str:
    """What a failed wait on FineTuneJob `name` needs: its status, the events of both namespaces and the tail of
    every operator pod's log (the previous version's and the upgraded one's, oldest first)."""
    ftj = (
        cluster.admin.get_or_none(f"/apis/kubetune.io/v1alpha1/namespaces/{WATCHED}/finetunejobs/{name}")
        or {}
    )
    events = [
        f"{e['metadata']['namespace']} {e.get('type')} {e.get('reason')} "
        f"{(e.get('involvedObject') or {}).get('name')}: {e.get('message')}"
        for ns in (WATCHED, RELEASE_NS)
        for e in cluster.admin.get(f"/api/v1/namespaces/{ns}/events")["items"]
    ]
    log = node.pod_logs(RELEASE_NS, FULLNAME)
    return (
        f"status of {name}: {json.dumps(ftj.get('status'))}\nevents:\n"
        + "\n".join(events[-40:])
        + f"\noperator log (tail):\n{log[-6000:]}"
    )


def test_install_previous_version_upgrade_test_and_uninstall(
    cluster: Cluster, kubelet_node: Any, tmp_path: Path
) -> None:
    helm = [str(binaries.ensure("helm")["helm"]), "--kubeconfig", str(cluster.kubeconfig)]
    old_version, old_chart = previous_chart(tmp_path)
    new_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    for ns in (RELEASE_NS, WATCHED):
        cluster.create_namespace(ns, RESTRICTED)
    # The current CRD, applied as the suite does (and the docs say to on every upgrade: helm installs crds/ once and
    # never upgrades it), so the old chart's install leaves it alone.
    r = cluster.kubectl(
        "apply", "--server-side", "-f", str(ROOT / "crds" / "kubetune.io_finetunejobs.yaml"), check=False
    )
    assert r.returncode == 0, r.stderr
    wait_for("CRD Established", lambda: cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io",
                                                        "--timeout=60s", check=False).returncode == 0, 90, 1)  # fmt: skip
    # Both chart versions run the operator image this repository builds (the node has no other): the test is
    # about the chart's objects across an upgrade.
    operator_image, trainer_image = chart_images()
    repository, _, tag = operator_image.rpartition(":")
    values = ["--namespace", RELEASE_NS, "--set", f"watchNamespaces={{{WATCHED}}}", "--set", "replicas=1",
              "--set", "pollInterval=1", "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
              "--set", f"trainerImage={trainer_image}", "--wait", "--timeout", "240s"]  # fmt: skip

    def run(*args: str) -> str:
        r = subprocess.run([*helm, *args], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            print(
                cluster.kubectl("-n", RELEASE_NS, "describe", "pods", check=False).stdout[-6000:],
                file=sys.stderr,
            )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def suspended(name: str) -> dict[str, Any]:
        """The operator records FineTuneJob `name` (created with runPolicy.suspend) as Suspended."""
        path = f"/apis/kubetune.io/v1alpha1/namespaces/{WATCHED}/finetunejobs/{name}"
        try:
            return cluster.admin.wait_for(
                path, lambda o: (o.get("status") or {}).get("phase") == "Suspended", 120
            )
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{diagnosis(cluster, kubelet_node, name)}") from None

    def chart_of_release() -> str:
        return str(yaml.safe_load(run("list", "-n", RELEASE_NS, "-o", "yaml"))[0]["chart"])

    # 1. The previous version, as a user installed it.
    run("install", RELEASE, str(old_chart), *values)
    assert chart_of_release() == f"kubetune-{old_version}"
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "survivor"},
           "spec": {"model": {"source": "s3://models/tiny"}, "dataset": {"train": "s3://data/train.jsonl"},
                    "output": {"uri": "s3://out/survivor"},
                    "runPolicy": {"suspend": True}}}  # no pods: the operator only records it Suspended  # fmt: skip
    cluster.kubectl("-n", WATCHED, "apply", "-f", "-", input=yaml.safe_dump(job))
    phase = f"/apis/kubetune.io/v1alpha1/namespaces/{WATCHED}/finetunejobs/survivor"
    suspended("survivor")

    # 2. Upgrade to this chart: the Deployment rolls to the new template, the operator still reconciles.
    run("upgrade", RELEASE, str(CHART), *values)
    assert chart_of_release() == f"kubetune-{new_version}"
    deployment = cluster.admin.get(f"/apis/apps/v1/namespaces/{RELEASE_NS}/deployments/{FULLNAME}")
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert deployment["status"].get("readyReplicas") == 1 and deployment["status"].get("updatedReplicas") == 1
    # The new operator pod reconciles jobs it has never seen: one on survivor's output is Suspended as asked, and
    # says it could not start while survivor holds that output (tests/test_output_overlap.py); one with its own
    # output is simply Suspended.
    shared = {**job, "metadata": {"name": "shares-survivors-output"}}
    cluster.kubectl("-n", WATCHED, "apply", "-f", "-", input=yaml.safe_dump(shared))
    running = {c["type"]: c for c in suspended("shares-survivors-output")["status"]["conditions"]}["Running"]
    assert running["reason"] == "OutputInUse" and "FineTuneJob ct-jobs/survivor" in running["message"], (
        running
    )
    after = {
        **job,
        "metadata": {"name": "after-upgrade"},
        "spec": {**job["spec"], "output": {"uri": "s3://out/after-upgrade"}},
    }
    cluster.kubectl("-n", WATCHED, "apply", "-f", "-", input=yaml.safe_dump(after))
    running = {c["type"]: c for c in suspended("after-upgrade")["status"]["conditions"]}["Running"]
    assert running["reason"] == "JobSuspended", running
    out = run(
        "test", RELEASE, "--namespace", RELEASE_NS, "--timeout", "180s"
    )  # its Pod, admitted under restricted
    assert re.search(rf"TEST SUITE:\s+{FULLNAME}-test\n.*\n.*\n\s*Phase:\s+Succeeded", out), out

    # The serving Deployment's pod, admitted under restricted and run by the kubelet as a non-root user (the operator
    # image stands in for a model server: `kubetune crd` prints and exits 0).
    spec = parse_spec(
        {**job["spec"], "serving": {"kind": "Deployment", "image": operator_image, "args": ["crd"]}}
    )
    serving = render_serving(spec, "survivor", WATCHED, {"mergedModel": "s3://out/survivor/model/"})
    cluster.kubectl("-n", WATCHED, "apply", "-f", "-", input=yaml.safe_dump(serving))

    def served_once() -> bool:
        pods = cluster.admin.get(
            f"/api/v1/namespaces/{WATCHED}/pods", labelSelector="kubetune.io/serving=survivor"
        )["items"]
        states = [s.get(k, {}).get("terminated") for p in pods for s in p["status"].get("containerStatuses") or []
                  for k in ("state", "lastState")]  # fmt: skip
        return any(t and t.get("exitCode") == 0 for t in states)

    wait_for("the serving pod ran", served_once, 180, 1)
    cluster.kubectl("-n", WATCHED, "delete", "deployment", serving["metadata"]["name"], "--wait=false")

    # 3. Namespace users: the built-in edit and view roles now carry FineTuneJobs (aggregated by the controller-manager).
    editor, viewer = f"system:serviceaccount:{WATCHED}:editor", f"system:serviceaccount:{WATCHED}:viewer"
    for sa, role in (("editor", "edit"), ("viewer", "view")):
        cluster.kubectl("-n", WATCHED, "create", "serviceaccount", sa)
        cluster.kubectl(
            "-n",
            WATCHED,
            "create",
            "rolebinding",
            sa,
            f"--clusterrole={role}",
            f"--serviceaccount={WATCHED}:{sa}",
        )
    wait_for("edit aggregates finetunejobs", lambda: can_i(cluster, "create", editor), 60, 1)
    assert (
        can_i(cluster, "delete", editor)
        and can_i(cluster, "list", viewer)
        and can_i(cluster, "watch", viewer)
    )
    assert not can_i(cluster, "create", viewer)

    # 4. Uninstall: the release's objects go; the CRD and the FineTuneJobs stay.
    run("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout", "120s")
    assert cluster.admin.get_or_none(f"/apis/apps/v1/namespaces/{RELEASE_NS}/deployments/{FULLNAME}") is None
    for role in (FULLNAME, f"{FULLNAME}-edit", f"{FULLNAME}-view"):
        assert cluster.admin.get_or_none(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}") is None, (
            role
        )
    assert cluster.admin.get_or_none(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io"
    )
    assert cluster.admin.get_or_none(phase) is not None
    cluster.kubectl("-n", WATCHED, "delete", "ftj", "--all", "--wait=false", check=False)
