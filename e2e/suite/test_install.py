"""Item 1: install from crds/ and the chart; the operator runs under the chart's RBAC, no broader."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import NAMESPACES, NODE_MODE, RELEASE_NS, SA, render_chart

pytestmark = pytest.mark.e2e
WATCHED = NAMESPACES["happy"]
SUBJECT = f"system:serviceaccount:{RELEASE_NS}:{SA}"


def can_i(kctl: Any, kubeconfig: Any, *args: str) -> bool:
    r = kctl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    answer = r.stdout.strip()
    assert answer in ("yes", "no"), (args, r.stdout, r.stderr)
    return answer == "yes"


def test_chart_objects_installed_and_deployment_admitted(installed, kctl, operator):
    kinds = {d["kind"] for d in installed["docs"]}
    assert {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    } <= kinds
    assert kctl.get(RELEASE_NS, "serviceaccount", SA)
    for ns in NAMESPACES.values():
        assert kctl.get(ns, "role", "kubetune"), ns
        assert kctl.get(ns, "rolebinding", "kubetune"), ns
    dep = installed["deployment"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == SA
    created = kctl.get(RELEASE_NS, "deployment", dep["metadata"]["name"])
    if NODE_MODE == "kubelet":  # the real node runs the operator image as the Deployment's pod
        assert created and created["status"].get("readyReplicas") == 1, created and created["status"]
    else:  # admitted by a server-side dry run (the node agent cannot run an image): not created
        assert created is None


def test_operator_runs_under_chart_serviceaccount(installed, operator, kctl):
    who = kctl(
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
        kubeconfig=installed["kubeconfig"],
        check=False,
    )
    if who.returncode == 0:
        assert who.stdout.strip() == SUBJECT
    assert operator.healthy()


# What the operator needs (docs/operations/install.md "RBAC") in a watched namespace ...
NEEDED = [
    ("list", "finetunejobs.kubetune.io"),
    ("watch", "finetunejobs.kubetune.io"),
    ("delete", "finetunejobs.kubetune.io"),
    ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
    ("create", "jobs.batch"),
    ("list", "jobs.batch"),
    ("watch", "jobs.batch"),
    ("patch", "jobs.batch"),
    ("delete", "jobs.batch"),
    ("create", "configmaps"),
    ("patch", "configmaps"),
    ("create", "services"),
    ("list", "pods"),
    ("watch", "pods"),
    ("patch", "pods"),  # a gang generation released: its scheduling gate lifted, its label set
    ("delete", "pods"),  # a gang restart in place deletes the failed generation's pods
    ("patch", "pods", "--subresource=status"),  # a pod lost with its node marked Failed
    ("create", "events"),
    ("create", "deployments.apps"),
    ("get", "deployments.apps"),
    ("update", "deployments.apps"),  # spec.serving
]
# ... and what it must not be able to do there.
DENIED = [
    ("create", "pods"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("delete", "deployments.apps"),
    ("list", "deployments.apps"),
    ("patch", "deployments.apps"),
    ("update", "finetunejobs.kubetune.io"),
    ("create", "finetunejobs.kubetune.io"),
    ("delete", "configmaps"),
    ("get", "configmaps"),
    ("create", "pods/exec"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "leases.coordination.k8s.io"),
    ("update", "jobs.batch"),
    ("patch", "finetunejobs.kubetune.io"),  # no finalizer, no annotations: only the status is written
]


@pytest.mark.parametrize("verb_resource", NEEDED, ids=lambda v: " ".join(v))
def test_rbac_allows_what_operator_needs(installed, kctl, verb_resource):
    assert can_i(kctl, installed["kubeconfig"], *verb_resource, "-n", WATCHED)


@pytest.mark.parametrize("verb_resource", DENIED, ids=lambda v: " ".join(v))
def test_rbac_denies_in_watched_namespace(installed, kctl, verb_resource):
    assert not can_i(kctl, installed["kubeconfig"], *verb_resource, "-n", WATCHED)


@pytest.mark.parametrize(
    "args",
    [
        ("list", "finetunejobs.kubetune.io", "-n", "default"),  # not a watched namespace
        ("create", "jobs.batch", "-n", "default"),
        ("list", "secrets", "--all-namespaces"),
        ("get", "secrets", "-n", "kube-system"),
        ("list", "pods", "--all-namespaces"),
        ("list", "namespaces"),  # only with watchNamespaces empty
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("*", "*", "--all-namespaces"),
    ],
    ids=lambda a: " ".join(a),
)
def test_rbac_denies_outside_watched_scope(installed, kctl, args):
    assert not can_i(kctl, installed["kubeconfig"], *args)


# Leader election: in the release namespace only, and only this release's Lease (named after the release's
# full name) can be read or renewed.
LEASE = "kubetune"
LEASES = [
    (True, "create", "leases.coordination.k8s.io"),
    (True, "get", f"leases.coordination.k8s.io/{LEASE}"),
    (True, "update", f"leases.coordination.k8s.io/{LEASE}"),
    (False, "get", "leases.coordination.k8s.io/other"),
    (False, "delete", f"leases.coordination.k8s.io/{LEASE}"),
    (False, "list", "leases.coordination.k8s.io"),
]


@pytest.mark.parametrize(("allowed", "verb", "what"), LEASES, ids=lambda v: str(v))
def test_rbac_for_the_leader_lease(installed, kctl, allowed, verb, what):
    assert can_i(kctl, installed["kubeconfig"], verb, what, "-n", RELEASE_NS) is allowed
    assert not can_i(kctl, installed["kubeconfig"], verb, what, "-n", WATCHED)


def test_cluster_rules_are_only_crd_discovery(installed, kctl):
    assert can_i(kctl, installed["kubeconfig"], "list", "customresourcedefinitions.apiextensions.k8s.io")
    assert can_i(kctl, installed["kubeconfig"], "watch", "customresourcedefinitions.apiextensions.k8s.io")


def test_all_namespaces_mode_renders_clusterrole_without_secrets(installed, kctl, cluster):
    """The default install (watch all namespaces): same rules in a ClusterRole, still no secrets, pods delete."""

    docs = render_chart()
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    r = kctl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        input=__import__("yaml").safe_dump_all(
            [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        ),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    resources = {
        (g, res): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
    }
    assert ("", "secrets") not in resources
    # pods: watched, released (patch), a failed generation deleted (the gang restart in place); never created
    assert resources.get(("", "pods"), set()) <= {"list", "watch", "patch", "delete"}
    # spec.serving creates a job's Deployment and re-points it (get, update): nothing else on deployments
    assert resources.get(("apps", "deployments"), set()) <= {"create", "get", "update"}
    # (inferenceservices are checked on the rendered rules only: kubectl auth can-i cannot map a resource whose CRD
    # is not installed in this cluster)
    assert resources.get(("serving.kserve.io", "inferenceservices"), set()) <= {"create", "get", "update"}
    assert resources[("", "namespaces")] == {"list", "watch"}


def test_operator_makes_no_forbidden_calls(operator):
    """Every call the operator made so far (startup, discovery, watches) was allowed by the chart RBAC."""
    import time

    time.sleep(3)
    bad = [line for line in operator.text().splitlines() if "forbidden" in line.lower()]
    assert not bad, "\n".join(bad[:5])
