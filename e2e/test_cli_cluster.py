"""The CLI's kubectl conventions against a real API server: -A, -l (selected by the server), -o
yaml|json|wide|name on get, describe and submit, and a token the server refuses (one line, exit 1).
No operator runs: the FineTuneJobs stay as applied, which is all these commands read.

    .venv/bin/pytest e2e/test_cli_cluster.py -m e2e
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.cluster import Cluster, write_kubeconfig
from harness.waiting import wait_for

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
KUBETUNE = Path(sys.executable).parent / "kubetune"


def kubetune(
    cluster: Cluster, *args: str, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig or cluster.kubeconfig)
    return subprocess.run([str(KUBETUNE), *args], env=env, capture_output=True, text=True, timeout=120)


def manifest(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "labels": labels or {}}
    doc["spec"]["runPolicy"] = {"suspend": True}
    return dict(doc)


@pytest.fixture(scope="module")
def two_namespaces(cluster: Cluster) -> Iterator[tuple[str, str]]:
    r = cluster.kubectl("apply", "--server-side", "-f", str(CRD), check=False)
    assert r.returncode == 0, r.stderr
    wait_for("CRD Established", lambda: cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io",
                                                        "--timeout=60s", check=False).returncode == 0, 90, 1)  # fmt: skip
    suffix = uuid.uuid4().hex[:6]
    a, b = f"cli-a-{suffix}", f"cli-b-{suffix}"
    for ns, docs in (
        (a, [manifest("tagged", {"team": "nlp"}), manifest("plain")]),
        (b, [manifest("elsewhere", {"team": "nlp"})]),
    ):
        cluster.create_namespace(ns)
        cluster.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    yield a, b
    for ns in (a, b):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_get_all_namespaces_and_a_label_selector(cluster: Cluster, two_namespaces: tuple[str, str]) -> None:
    a, b = two_namespaces
    r = kubetune(cluster, "get", "-A", "-o", "name")
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.splitlines())
    assert {
        "finetunejob.kubetune.io/tagged",
        "finetunejob.kubetune.io/plain",
        "finetunejob.kubetune.io/elsewhere",
    } <= names
    table = kubetune(cluster, "get", "-A").stdout.splitlines()
    assert table[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert {(a, "plain"), (a, "tagged"), (b, "elsewhere")} <= {tuple(line.split()[:2]) for line in table[1:]}
    selected = kubetune(cluster, "get", "-n", a, "-l", "team=nlp", "-o", "json")
    assert [i["metadata"]["name"] for i in json.loads(selected.stdout)["items"]] == ["tagged"]
    everywhere = kubetune(cluster, "get", "-A", "-l", "team=nlp", "-o", "name").stdout.splitlines()
    assert sorted(everywhere) == ["finetunejob.kubetune.io/elsewhere", "finetunejob.kubetune.io/tagged"]


def test_output_formats_of_get_describe_and_submit(
    cluster: Cluster, two_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    a, _ = two_namespaces
    wide = kubetune(cluster, "get", "-n", a, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-4:] == ["METHOD", "NODES", "GPUS/NODE", "MODEL"] and len(wide) == 3
    described = yaml.safe_load(kubetune(cluster, "describe", "plain", "-n", a, "-o", "yaml").stdout)
    assert (described["kind"], described["metadata"]["name"], described["metadata"]["namespace"]) == (
        "FineTuneJob",
        "plain",
        a,
    )
    assert (
        kubetune(cluster, "describe", "plain", "-n", a, "-o", "name").stdout
        == "finetunejob.kubetune.io/plain\n"
    )
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(manifest("submitted")))
    r = kubetune(cluster, "submit", str(path), "-n", a, "-o", "name")
    assert (r.returncode, r.stdout) == (0, "finetunejob.kubetune.io/submitted\n"), r.stderr


def test_a_token_the_server_refuses_is_one_line_and_exit_1(cluster: Cluster, two_namespaces: tuple[str, str],
                                                           tmp_path: Path) -> None:  # fmt: skip
    bogus = write_kubeconfig(
        tmp_path / "bogus.kubeconfig", cluster.server, cluster.ca.cert_file, "nobody", token="not-a-token"
    )
    for argv in (["get", "-A"], ["describe", "plain", "-n", two_namespaces[0]]):
        r = kubetune(cluster, *argv, kubeconfig=bogus)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(
            f"kubetune {argv[0]}: you must be logged in to the API server (Unauthorized"
        ), r.stderr
