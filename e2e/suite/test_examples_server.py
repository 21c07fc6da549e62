"""Every shipped example and the crds/ directory as a user applies them: accepted by the real API server (the
CRD's schema and CEL rules, server-side dry run), and a broken one refused there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CRD
from harness import kueue

pytestmark = pytest.mark.e2e
ROOT = CRD.parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_crds_directory_applies_server_side(installed: dict[str, Any], kctl: Any) -> None:
    r = kctl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        str(ROOT / "crds"),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert (
        "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubetune.io serverside-applied"
        in r.stdout
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_api_server(
    path: Path, installed: dict[str, Any], kctl: Any, namespace: str, cluster: Any
) -> None:
    if "apiVersion: kueue.x-k8s.io/" in path.read_text():  # its queues and priorities: Kueue's own CRDs
        kueue.install_crds(cluster)
    r = kctl("-n", namespace, "apply", "--dry-run=server", "-f", str(path), check=False)
    assert r.returncode == 0, f"{path.name}: {r.stderr}"
    assert "created (server dry run)" in r.stdout


def test_a_broken_example_is_refused_by_the_api_server(
    installed: dict[str, Any], kctl: Any, namespace: str
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    doc["spec"]["distributed"]["nodes"] = 0
    r = kctl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert r.returncode != 0 and "spec.distributed.nodes" in r.stderr, r.stderr
