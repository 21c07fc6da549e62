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

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
BUILD_SH = ROOT / "e2e" / "harness" / "build.sh"


@functools.cache
def helm_path() -> str:
    cache = os.environ.get("KUBETUNE_E2E_CACHE") or os.path.expanduser("~/.cache/kubetune-e2e")
    found = [os.environ.get("HELM"), shutil.which("helm"), *sorted(glob.glob(f"{cache}/helm-*/bin/helm"), reverse=True)]
    helm = next((c for c in found if c and os.access(c, os.X_OK)), None)
    if helm is None:
        if os.environ.get("KUBETUNE_E2E_BUILD", "1") == "0":
            pytest.skip("no helm binary and KUBETUNE_E2E_BUILD=0 (run e2e/harness/build.sh to build one)")
        subprocess.run(["bash", str(BUILD_SH)], env={**os.environ, "KUBETUNE_E2E_COMPONENTS": "helm"}, check=True)
        helm = sorted(glob.glob(f"{cache}/helm-*/bin/helm"))[-1]
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_path(), *args], capture_output=True, text=True, check=check, timeout=120)


def template(*sets: str) -> list[dict]:
    args = ["template", "kt", str(CHART), "--namespace", "kubetune-system", "--include-crds"]
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
        ("", "events", "create"),
        ("serving.kserve.io", "inferenceservices", "create"),
        ("serving.kserve.io", "inferenceservices", "get"),
        ("serving.kserve.io", "inferenceservices", "update"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "update"),
    }
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
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_LEADER_ELECT"] == "true" and env["KUBETUNE_LEADER_ELECT_LEASE_NAME"] == "kt-kubetune"
    assert env["KUBETUNE_LEADER_ELECT_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert [env[f"KUBETUNE_LEADER_ELECT_{k}"] for k in ("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")] == ["15", "10", "2"]
    [pdb] = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]


def test_leader_election_role_reads_and_renews_only_this_releases_lease():
    [role] = [r for r in by_kind(template(), "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == "kubetune-system"
    assert grants(role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")}
    assert [r.get("resourceNames") for r in role["rules"]] == [None, ["kt-kubetune"]]


def test_without_leader_election_one_replica_is_recreated():
    docs = template("leaderElection.enabled=false", "replicas=1")
    [deploy] = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not [e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if "LEADER" in e["name"]]
    assert by_kind(docs, "Role") == [] and by_kind(docs, "PodDisruptionBudget") == []


def test_several_replicas_without_leader_election_are_refused():
    result = helm("template", "kt", str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert result.returncode != 0 and "replicas > 1 needs leaderElection.enabled=true" in result.stderr


def test_operator_pod_is_non_root_with_liveness_probe():
    [deploy] = by_kind(template(), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_cluster_rbac_grants_exactly_what_the_operator_uses():
    [role] = by_kind(template(), "ClusterRole")
    assert grants(role["rules"]) == NAMESPACED | KOPF_CLUSTER | KOPF_ALL_NAMESPACES


def test_watch_namespaces_gives_namespaced_roles_and_only_crd_access_cluster_wide():
    docs = template("watchNamespaces={team-a,team-b}")
    roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(grants(r["rules"]) == NAMESPACED for r in roles)
    [cluster] = by_kind(docs, "ClusterRole")
    assert grants(cluster["rules"]) == KOPF_CLUSTER
    bindings = [b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_helm_test_hook_pod_is_rendered():
    pods = [
        d for d in by_kind(template(), "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"
    ]
    assert len(pods) == 1


def test_values_schema_rejects_unknown_keys():
    result = helm("template", "kt", str(CHART), "--set", "replica=2", check=False)
    assert result.returncode != 0 and "additional properties" in (result.stderr + result.stdout).lower()


def test_values_schema_rejects_bad_log_format():
    result = helm("template", "kt", str(CHART), "--set", "logFormat=xml", check=False)
    assert result.returncode != 0


def test_chart_crd_is_the_generated_one():
    crd = (CHART / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    assert crd == (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()


def test_kustomize_base_operator_manifest_is_the_rendered_chart():
    rendered = helm("template", "kubetune", str(CHART), "--namespace", "kubetune-system").stdout
    committed = (ROOT / "deploy" / "kustomize" / "base" / "operator.yaml").read_text()
    assert committed == rendered, "helm template kubetune charts/kubetune -n kubetune-system > deploy/kustomize/base/operator.yaml"


MONITORING = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule")


def template_with_api(apis: tuple[str, ...], *sets: str) -> list[dict]:
    args = ["template", "kt", str(CHART), "--namespace", "kubetune-system"]
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
    dashboard = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kt-kubetune-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubetune.json"]) == json.loads((CHART / "dashboards" / "kubetune.json").read_text())
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]


def test_monitors_and_rules_render_only_where_their_crds_exist():
    on = ("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", "metrics.prometheusRule.enabled=true")
    assert not [d for d in template_with_api((), *on) if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
    docs = template_with_api(MONITORING, *on, "metrics.serviceMonitor.labels.release=prom")
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert monitor["metadata"]["labels"]["release"] == "prom" and monitor["spec"]["endpoints"][0]["honorLabels"] is True
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


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus; .ci/run installs it)")
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
