"""The release pipeline's checks that run without a registry: its workflows lint clean (actionlint, built from
its Go module), and its package/chart build step (.ci/release-build.sh, which the workflow runs) produces a
wheel with PyPI-ready metadata and no training stack in the base install, and a chart of the same version."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import kubetune
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_chart import helm_path  # noqa: E402  (the pinned helm, built on first use)

pytestmark = pytest.mark.slow  # builds actionlint (Go, ~1 min cold) and the sdist/wheel


def test_workflows_pass_actionlint() -> None:
    workflows = sorted((ROOT / ".github/workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "release.yml"}
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci/actionlint.sh"), *map(str, workflows)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_release_workflow_publishes_what_the_version_ties_together() -> None:
    wf = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    assert wf[True]["push"]["tags"] == ["v*.*.*"]  # `on:` parses as True in YAML 1.1
    text = (ROOT / ".github/workflows/release.yml").read_text()
    for needed in (
        "linux/amd64,linux/arm64",
        "cosign sign",
        "helm push",
        "pypa/gh-action-pypi-publish",
        "operator_image/Dockerfile",
        "trainer_image/Dockerfile",
        ".ci/release-build.sh",
        "spdx",
    ):
        assert needed in text, needed
    assert wf["jobs"]["pypi"]["permissions"] == {"id-token": "write"}  # trusted publishing: no API token


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "HELM": helm_path(),
        "RELEASE_TAG": f"v{kubetune.__version__}",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci/release-build.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_release_build_refuses_a_tag_that_is_not_the_version(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "RELEASE_TAG": "v9.9.9"}
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci/release-build.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"does not match kubetune.__version__ {kubetune.__version__}" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_wheel_metadata_is_pypi_ready_and_the_base_install_has_no_torch(dist: Path) -> None:
    version = kubetune.__version__
    (wheel,) = dist.glob(f"kubetune-{version}-py3-none-any.whl")
    assert (dist / f"kubetune-{version}.tar.gz").exists()
    with zipfile.ZipFile(wheel) as zf:
        meta = Parser().parsestr(zf.read(f"kubetune-{version}.dist-info/METADATA").decode())
        names = zf.namelist()
    assert meta["License-Expression"] == "Apache-2.0"
    assert f"kubetune-{version}.dist-info/licenses/LICENSE" in names
    assert "kubetune/cli/main.py" in names and "kubetune_trainer/__main__.py" in names
    assert meta["Description-Content-Type"] == "text/markdown" and "kubetune" in meta.get_payload()
    assert any(u.startswith("Source, ") for u in meta.get_all("Project-URL"))
    assert "Programming Language :: Python :: 3.11" in meta.get_all("Classifier")
    base = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [
        r for r in base if r.split(">")[0].split("=")[0].strip() in ("torch", "transformers", "kopf")
    ], base
    trainer = [r for r in meta.get_all("Requires-Dist") if 'extra == "trainer"' in r]
    assert any(r.startswith("torch") for r in trainer)
    assert {"operator", "trainer", "client"} <= set(meta.get_all("Provides-Extra"))


def test_chart_package_has_the_version(dist: Path) -> None:
    version = kubetune.__version__
    with tarfile.open(dist / f"kubetune-{version}.tgz") as tf:
        member = tf.extractfile("kubetune/Chart.yaml")
        assert member is not None
        chart = yaml.safe_load(member.read())
    assert chart["version"] == version and chart["appVersion"] == version
