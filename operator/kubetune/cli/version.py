"""`kubetune version`: this client's version and, when a cluster is reachable, the operator's and the CRD's.

Like `kubectl version`, a cluster that cannot be reached is one line, not a failure: the client version is
always printed and the exit code is 0. A version that differs from the client's is a warning (skew).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from kubetune import __version__
from kubetune.api.models import GROUP, PLURAL

CRD_NAME = f"{PLURAL}.{GROUP}"
VERSION_LABEL = "app.kubernetes.io/version"
# The chart labels its Deployment with app.kubernetes.io/name=kubetune and the app version.
OPERATOR_SELECTOR = "app.kubernetes.io/name=kubetune"


@dataclass
class Versions:
    client: str = __version__
    crd: str | None = None
    operators: list[dict[str, str]] = field(default_factory=list)  # namespace/name, version
    cluster: str | None = None  # why the cluster's versions are missing, when they are

    def skew(self) -> list[str]:
        found = [("the CRD", self.crd)] + [
            (f"the operator {o['deployment']}", o["version"]) for o in self.operators
        ]
        return [
            f"{what} is {version}, this client is {self.client}"
            for what, version in found
            if version and version != self.client
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--client", action="store_true", help="print only the client version (no cluster calls)"
    )
    parser.add_argument("-o", "--output", choices=["yaml", "json"], help="print the versions as YAML or JSON")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    parser.add_argument("--request-timeout", type=float, default=5.0, help="seconds per API call (default 5)")


def _one_line(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status:  # kubernetes ApiException
        return f"the API server answered {status} {reason or ''}".strip()
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__


def cluster_versions(versions: Versions, kubeconfig: str | None, context: str | None, timeout: float) -> None:
    """Fill in the CRD's and the operators' versions; on any failure say why in `versions.cluster`."""
    from kubernetes import client

    from kubetune.client import ClientError
    from kubetune.client.cluster import connect

    try:
        api, _ = connect(kubeconfig, context)
    except ClientError as exc:
        versions.cluster = str(exc)
        return
    try:
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(
            CRD_NAME, _request_timeout=timeout
        )
    except Exception as exc:  # unreachable, refused, unauthorised: all one line, never a traceback
        if getattr(exc, "status", None) == 404:
            versions.cluster = f"the CRD {CRD_NAME} is not installed"
        else:
            versions.cluster = f"cannot reach the cluster: {_one_line(exc)}"
            return
    else:
        versions.crd = (crd.metadata.labels or {}).get(VERSION_LABEL) or "unknown (no version label)"
    try:
        deployments = client.AppsV1Api(api).list_deployment_for_all_namespaces(
            label_selector=OPERATOR_SELECTOR, _request_timeout=timeout
        )
    except Exception as exc:
        versions.cluster = versions.cluster or f"cannot list the operator's Deployments: {_one_line(exc)}"
        return
    for d in deployments.items:
        labels = d.metadata.labels or {}
        versions.operators.append(
            {
                "deployment": f"{d.metadata.namespace}/{d.metadata.name}",
                "version": labels.get(VERSION_LABEL, "unknown"),
            }
        )
    if not versions.operators and not versions.cluster:
        versions.cluster = f"no operator Deployment found (label {OPERATOR_SELECTOR})"


def run(args: argparse.Namespace) -> int:
    versions = Versions()
    if not args.client:
        cluster_versions(versions, args.kubeconfig, args.context, args.request_timeout)
    if args.output:
        doc: dict[str, Any] = {k: v for k, v in asdict(versions).items() if v not in (None, [])}
        print(
            json.dumps(doc, indent=2) if args.output == "json" else yaml.safe_dump(doc, sort_keys=False),
            end="",
        )
        if args.output == "json":
            print()
    else:
        print(f"Client Version: {versions.client}")
        if versions.crd:
            print(f"CRD Version: {versions.crd}")
        for op in versions.operators:
            print(f"Operator Version: {op['version']} ({op['deployment']})")
        if versions.cluster:
            print(f"Cluster: {versions.cluster}")
    for line in versions.skew():
        print(f"WARNING: version skew: {line}", file=sys.stderr)
    return 0
