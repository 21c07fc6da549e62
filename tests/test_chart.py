"""The Helm chart renders, its values are schema-checked, and its RBAC grants exactly what is used.

Needs a `helm` binary: $HELM, `helm` on PATH, or the pinned one e2e/harness/build.sh builds from
its Go module into ${KUBETUNE_E2E_CACHE:-~/.cache/kubetune-e2e}/helm-*/bin/helm (built on first use,
about 3 min cold; skipped only with KUBETUNE_E2E_BUILD=0 and no helm).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e_build  # helm: after the other tests under tests/ (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
BUILD_SH = ROOT / "e2e" / "harness" / "build.sh"
# `helm template` checks the chart's kubeVersion against this (the e2e cluster's) rather than helm's built-in
# default, which a helm built from its Go module without release ldflags sets to v1.20.
KUBE_VERSION = next(
    line.split("=", 1)[1].strip().lstrip("v")
    for line in (ROOT / "e2e" / "harness" / "versions.env").read_text().splitlines()
    if line.startswith("KUBERNETES_VERSION=")
)


@functools.cache
def helm_path() -> str:
    cache = os.environ.get("KUBETUNE_E2E_CACHE") or os.path.expanduser("~/.cache/kubetune-e2e")
    found = [
        os.environ.get("HELM"),
        shutil.which("helm"),
        *sorted(glob.glob(f"{cache}/helm-*/bin/helm"), reverse=True),
    ]
    helm = next((c for c in found if c and os.access(c, os.X_OK)), None)
    if helm is None:
        if os.environ.get("KUBETUNE_E2E_BUILD", "1") == "0":
            pytest.skip("no helm binary and KUBETUNE_E2E_BUILD=0 (run e2e/harness/build.sh to build one)")
        subprocess.run(
            ["bash", str(BUILD_SH)], env={**os.environ, "KUBETUNE_E2E_COMPONENTS": "helm"}, check=True
        )
        helm = sorted(glob.glob(f"{cache}/helm-*/bin/helm"))[-1]
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_path(), *args], capture_output=True, text=True, check=check, timeout=120)


def template(*sets: str) -> list[dict]:
    args = [
        "template",
        "kt",
        str(CHART),
        "--namespace",
        "kubetune-system",
        "--include-crds",
        "--kube-version",
        KUBE_VERSION,
    ]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


NAMESPACED = (
    {("kubetune.io", "finetunejobs", v) for v in ("list", "watch", "delete")}
    | {("kubetune.io", "finetunejobs/status", "patch")}
    | {("batch", "jobs", v) for v in ("create", "list", "watch", "patch", "delete")}
    | {
        ("", "configmaps", "create"),
        ("", "configmaps", "patch"),
        ("", "services", "create"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "patch"),  # a gang generation's release: its gate lifted, its generation label set
        ("", "pods", "delete"),  # a gang restart in place: the failed generation's pods
        ("", "pods/status", "patch"),  # ... and one lost with its node marked Failed
        ("", "events", "create"),
        ("serving.kserve.io", "inferenceservices", "create"),
        ("serving.kserve.io", "inferenceservices", "get"),
        ("serving.kserve.io", "inferenceservices", "update"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "update"),
    }
    | {
        (g, "podgroups", "create")
        for g in ("scheduling.x-k8s.io", "scheduling.volcano.sh", "scheduling.run.ai")
    }
    | {("kueue.x-k8s.io", "workloads", v) for v in ("list", "watch")}
)
KOPF_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
KOPF_ALL_NAMESPACES = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def test_helm_lint_passes():
    result = helm("lint", str(CHART), "--strict", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_install_renders_crd_deployment_and_cluster_rbac():
    docs = template()
    assert [d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition")] == [
        "finetunejobs.kubetune.io"
    ]
    [deploy] = by_kind(docs, "Deployment")
    assert "--all-namespaces" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [r["metadata"]["name"] for r in by_kind(docs, "Role")] == ["kt-kubetune-leader-election"]


def test_two_replicas_elect_a_leader_and_roll_one_at_a_time():
    docs = template()
    [deploy] = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_LEADER_ELECT"] == "true" and env["KUBETUNE_LEADER_ELECT_LEASE_NAME"] == "kt-kubetune"
    assert env["KUBETUNE_LEADER_ELECT_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert [
        env[f"KUBETUNE_LEADER_ELECT_{k}"] for k in ("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")
    ] == ["15", "10", "2"]
    [pdb] = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]


def test_leader_election_role_reads_and_renews_only_this_releases_lease():
    [role] = [r for r in by_kind(template(), "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == "kubetune-system"
    assert grants(role["rules"]) == {
        ("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")
    }
    assert [r.get("resourceNames") for r in role["rules"]] == [None, ["kt-kubetune"]]


def test_without_leader_election_one_replica_is_recreated():
    docs = template("leaderElection.enabled=false", "replicas=1")
    [deploy] = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not [
        e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if "LEADER" in e["name"]
    ]
    assert by_kind(docs, "Role") == [] and by_kind(docs, "PodDisruptionBudget") == []


def test_several_replicas_without_leader_election_are_refused():
    result = helm(
        "template",
        "kt",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "leaderElection.enabled=false",
        check=False,
    )
    assert result.returncode != 0 and "replicas > 1 needs leaderElection.enabled=true" in result.stderr


def test_operator_pod_is_non_root_with_liveness_probe():
    [deploy] = by_kind(template(), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def operator_cluster_role(docs: list[dict]) -> dict:
    [role] = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "kt-kubetune"]
    return role


def test_cluster_rbac_grants_exactly_what_the_operator_uses():
    role = operator_cluster_role(template())
    assert grants(role["rules"]) == NAMESPACED | KOPF_CLUSTER | KOPF_ALL_NAMESPACES


def test_watch_namespaces_gives_namespaced_roles_and_only_crd_access_cluster_wide():
    docs = template("watchNamespaces={team-a,team-b}")
    roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(grants(r["rules"]) == NAMESPACED for r in roles)
    assert grants(operator_cluster_role(docs)["rules"]) == KOPF_CLUSTER
    bindings = [
        b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_helm_test_hook_pod_is_rendered():
    pods = [
        d for d in by_kind(template(), "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"
    ]
    assert len(pods) == 1


def restricted_violations(pod: dict) -> list[str]:
    """What Pod Security "restricted" (v1.32) would refuse in a pod spec; e2e checks the same against the
    API server's own admission in a namespace that enforces it."""
    bad = []
    sc = pod.get("securityContext") or {}
    if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        bad.append("spec.securityContext.seccompProfile")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= {
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        }:
            bad.append(f"volumes[{v['name']}]")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        csc = c.get("securityContext") or {}
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}.allowPrivilegeEscalation")
        if (csc.get("capabilities") or {}).get("drop") != ["ALL"] or set(
            (csc.get("capabilities") or {}).get("add") or []
        ) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}.capabilities")
        if not (csc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
            bad.append(f"{c['name']}.runAsNonRoot")
        if csc.get("privileged") or c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            bad.append(f"{c['name']}.privileged/hostPort")
    return bad


def test_operator_and_helm_test_pods_meet_pod_security_restricted_with_resources():
    docs = template()
    [deploy] = by_kind(docs, "Deployment")
    [test_pod] = by_kind(docs, "Pod")
    for pod in (deploy["spec"]["template"]["spec"], test_pod["spec"]):
        assert restricted_violations(pod) == []
        assert all(
            c["resources"]["requests"] and c["resources"]["limits"]["memory"] for c in pod["containers"]
        )
    assert restricted_violations({"containers": [{"name": "c"}]}) != []  # the check itself finds a bare pod


def test_operator_replicas_spread_over_nodes_unless_told_otherwise():
    [deploy] = by_kind(template(), "Deployment")
    [spread] = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert (
        spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    )
    assert spread["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    [one] = by_kind(template("leaderElection.enabled=false", "replicas=1"), "Deployment")
    assert "topologySpreadConstraints" not in one["spec"]["template"]["spec"]
    [zone] = by_kind(template("topologySpreadConstraints[0].maxSkew=2", "topologySpreadConstraints[0].topologyKey=zone",
                              "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule"), "Deployment")  # fmt: skip
    assert zone["spec"]["template"]["spec"]["topologySpreadConstraints"] == [
        {"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}
    ]


def test_namespace_users_get_finetunejobs_through_the_aggregated_edit_and_view_roles():
    docs = template()
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    edit, view = roles["kt-kubetune-edit"], roles["kt-kubetune-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {("kubetune.io", "finetunejobs", v) for v in ("create", "delete", "patch", "update")} <= grants(
        edit["rules"]
    )
    assert {v for (_, _, v) in grants(view["rules"])} == {"get", "list", "watch"}
    off = template("rbac.aggregateClusterRoles=false")
    assert [r["metadata"]["name"] for r in by_kind(off, "ClusterRole")] == ["kt-kubetune"]


def test_every_object_carries_the_standard_labels():
    for d in template():
        if d["kind"] == "CustomResourceDefinition":
            continue
        labels = d["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
        ):
            assert labels.get(key), (d["kind"], d["metadata"]["name"], key)
    [deploy] = by_kind(template(), "Deployment")
    assert deploy["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"


def test_the_chart_needs_a_supported_kubernetes():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.27.0-0"
    old = helm("template", "kt", str(CHART), "--kube-version", "1.26.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"leaseDuration": 10, "renewDeadline": 10},
            "leaderElection.renewDeadline (10) must be below leaderElection.leaseDuration (10)",
        ),
        (
            {"renewDeadline": 6, "retryPeriod": 5},
            "leaderElection.retryPeriod (5) must be below leaderElection.renewDeadline / 1.2 (5 s)",
        ),
    ],
)
def test_leader_election_timings_client_go_would_refuse_fail_at_template_time(values: dict, message: str):
    sets = [a for k, v in values.items() for a in ("--set-json", f"leaderElection.{k}={v}")]
    result = helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, *sets, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_schema_accepts_what_a_parent_chart_passes_a_subchart():
    docs = template("global.imageRegistry=registry.example.com", "enabled=true")
    assert by_kind(docs, "Deployment")
    bad = helm(
        "template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "--set", "enabled=maybe", check=False
    )
    assert bad.returncode != 0


CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def leaf_paths(values: dict, prefix: str = "") -> set[str]:
    """Every documented value's path; maps that are values themselves (resources, labels...) are one leaf."""
    out = set()
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in ("resources", "labels", "annotations"):
            out |= leaf_paths(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_ci_values_set_every_documented_value():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    every = yaml.safe_load((CHART / "ci" / "all-values.yaml").read_text())
    documented = leaf_paths(defaults)
    missing = [p for p in documented if _at(every, p) is _MISSING]
    assert missing == [], f"ci/all-values.yaml does not set {missing}"
    files = [yaml.safe_load(f.read_text()) for f in CI_VALUES]
    same = [p for p in documented if all(_at(f, p) in (_MISSING, _at(defaults, p)) for f in files)]
    assert same == [], f"no ci/*-values.yaml sets these away from their defaults: {same}"
    assert undocumented_values(documented) == [], "every value has a comment above it"
    assert len(CI_VALUES) >= 3


_MISSING = object()


def undocumented_values(documented: set[str]) -> list[str]:
    """The documented values' paths whose line in values.yaml has no comment line right above it."""
    stack: list[tuple[int, str]] = []
    previous, bare = "", []
    for line in (CHART / "values.yaml").read_text().splitlines():
        key, _, _ = line.strip().partition(":")
        if line.strip() and not line.lstrip().startswith(("#", "-")):
            indent = len(line) - len(line.lstrip())
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
            path = ".".join(k for _, k in stack)
            if path in documented and not previous.lstrip().startswith("#"):
                bare.append(path)
        if line.strip():
            previous = line
    return bare


def _at(values: object, path: str) -> object:
    for key in path.split("."):
        if not isinstance(values, dict) or key not in values:
            return _MISSING
        values = values[key]
    return values


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_lint_strict_and_template_with_each_ci_values_file(values: Path):
    lint = helm(
        "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, "-f", str(values), check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    api = [a for m in MONITORING for a in ("--api-versions", m)]
    docs = [d for d in yaml.safe_load_all(helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, *api,
                                                "-f", str(values)).stdout) if d]  # fmt: skip
    assert by_kind(docs, "Deployment")


def test_all_values_reach_the_objects():
    values = yaml.safe_load((CHART / "ci" / "all-values.yaml").read_text())
    api = [a for m in MONITORING for a in ("--api-versions", m)]
    docs = [d for d in yaml.safe_load_all(helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, *api, "-f",
                                               str(CHART / "ci" / "all-values.yaml")).stdout) if d]  # fmt: skip
    [deploy] = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]
    assert pod["serviceAccountName"] == "kubetune-operator" and not by_kind(docs, "ServiceAccount")
    assert pod["containers"][0]["image"] == "registry.example.com/kubetune/operator:0.2.0-rc1"
    assert (
        deploy["spec"]["replicas"] == 3
        and not by_kind(docs, "PodDisruptionBudget")
        and not by_kind(docs, "Pod")
    )
    assert {d["kind"] for d in docs} >= {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [r for r in by_kind(docs, "ClusterRole") if "aggregate" in str(r["metadata"]["labels"])]


def test_values_schema_rejects_unknown_keys():
    result = helm(
        "template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "--set", "replica=2", check=False
    )
    assert result.returncode != 0 and "additional properties" in (result.stderr + result.stdout).lower()


def test_values_schema_rejects_bad_log_format():
    result = helm(
        "template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "--set", "logFormat=xml", check=False
    )
    assert result.returncode != 0


def test_chart_crd_is_the_generated_one():
    crd = (CHART / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    assert crd == (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()


KUSTOMIZE_BASE = (
    f"helm template kubetune charts/kubetune -n kubetune-system --kube-version {KUBE_VERSION} --skip-tests"
)


def test_kustomize_base_operator_manifest_is_the_rendered_chart_without_test_hooks():
    rendered = helm(*KUSTOMIZE_BASE.split()[1:]).stdout
    committed = (ROOT / "deploy" / "kustomize" / "base" / "operator.yaml").read_text()
    assert committed == rendered, f"{KUSTOMIZE_BASE} > deploy/kustomize/base/operator.yaml"
    docs = [d for d in yaml.safe_load_all(committed) if d]
    assert by_kind(docs, "Pod") == []  # `kubectl apply -k` would run a helm test hook as a plain Pod
    assert not [d for d in docs if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]


MONITORING = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)


def template_with_api(apis: tuple[str, ...], *sets: str) -> list[dict]:
    args = ["template", "kt", str(CHART), "--namespace", "kubetune-system", "--kube-version", KUBE_VERSION]
    for api in apis:
        args += ["--api-versions", api]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def test_metrics_service_port_and_dashboard_by_default():
    docs = template()
    service = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "kt-kubetune-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics"}]
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 8000} in container["ports"]
    assert {"name": "KUBETUNE_METRICS_PORT", "value": "8000"} in container["env"]
    dashboard = next(
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kt-kubetune-dashboard"
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubetune.json"]) == json.loads(
        (CHART / "dashboards" / "kubetune.json").read_text()
    )
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]


def test_monitors_and_rules_render_only_where_their_crds_exist():
    on = (
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
    )
    assert not [
        d
        for d in template_with_api((), *on)
        if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    ]
    docs = template_with_api(MONITORING, *on, "metrics.serviceMonitor.labels.release=prom")
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert (
        monitor["metadata"]["labels"]["release"] == "prom"
        and monitor["spec"]["endpoints"][0]["honorLabels"] is True
    )
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"
    pods = by_kind(docs, "PodMonitor")[0]["spec"]
    assert pods["podMetricsEndpoints"][0]["port"] == "progress" and pods["namespaceSelector"] == {"any": True}
    rules = by_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"KubetuneJobStuckInitializing", "KubetuneJobNoProgress",
                                          "KubetuneJobRestartsClimbing", "KubetuneOperatorDown"}  # fmt: skip
    stuck = next(r for r in rules if r["alert"] == "KubetuneJobStuckInitializing")
    assert stuck["expr"] == 'kubetune_job_phase_seconds{phase="Initializing"} > 900'
    assert "{{ $labels.finetunejob }}" in stuck["annotations"]["summary"]
    assert not by_kind(template_with_api(MONITORING), "ServiceMonitor")  # off by default even with the CRDs


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus; .ci/run installs it)"
)
def test_the_prometheus_rules_pass_promtool_and_query_only_exported_metrics(tmp_path: Path):
    import re

    from test_metrics import exposed_names, promtool_check

    docs = template_with_api(MONITORING, "metrics.prometheusRule.enabled=true")
    rules = by_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    r = promtool_check(rules, tmp_path / "rules.yaml")
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr
    used = {n for rule in rules for n in re.findall(r"\bkubetune_[a-z_]+", rule["expr"])}
    assert len(used) >= 3 and used <= exposed_names(), sorted(used - exposed_names())


def test_metrics_can_be_turned_off():
    docs = template("metrics.enabled=false", "metrics.dashboard.enabled=false")
    assert not [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")]
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBETUNE_METRICS_PORT", "value": "0"} in container["env"]
    assert not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_network_policy_is_off_by_default_and_opens_the_gang_and_the_progress_port():
    assert not by_kind(template(), "NetworkPolicy")
    docs = template("networkPolicy.enabled=true", "watchNamespaces={team-a,team-b}")
    policies = by_kind(docs, "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in policies] == ["team-a", "team-b"]
    spec = policies[0]["spec"]
    workers = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/role": "worker"}
    assert spec["podSelector"] == {"matchLabels": workers} and spec["policyTypes"] == ["Ingress"]
    peers, operator = spec["ingress"]
    assert peers == {
        "from": [{"podSelector": {"matchLabels": workers}}]
    }  # every port: gloo and NCCL pick theirs
    assert operator["ports"] == [{"protocol": "TCP", "port": 8080}]
    [source] = operator["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubetune-system"}
    [deploy] = by_kind(docs, "Deployment")
    assert (
        source["podSelector"]["matchLabels"].items()
        <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    # without watched namespaces: the release's own
    alone = by_kind(template("networkPolicy.enabled=true"), "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in alone] == ["kubetune-system"]
