"""Packaging: one version everywhere, a CLI/SDK install without torch, `kubetune version` and completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kubetune
import pytest
import tomllib
import yaml
from kubetune.api.crd import crd
from kubetune.api.names import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "peft", "deepspeed", "kopf", "kubetune_trainer")


def _semver_tag(image: str) -> str:
    return image.rsplit(":", 1)[1]


def test_one_version_ties_package_images_chart_and_crd() -> None:
    version = kubetune.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"], (
        "the package version must come from kubetune.__version__"
    )
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kubetune.__version__"}
    chart = yaml.safe_load((ROOT / "charts/kubetune/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())
    found = {
        "charts/kubetune/Chart.yaml version": str(chart["version"]),
        "charts/kubetune/Chart.yaml appVersion": str(chart["appVersion"]),
        "charts/kubetune/values.yaml trainerImage": _semver_tag(values["trainerImage"]),
        "the operator's default trainer image": _semver_tag(DEFAULT_IMAGE),
        "the CRD's app.kubernetes.io/version label": crd()["metadata"]["labels"]["app.kubernetes.io/version"],
    }
    for place in ("crds/kubetune.io_finetunejobs.yaml", "charts/kubetune/crds/kubetune.io_finetunejobs.yaml"):
        doc = yaml.safe_load((ROOT / place).read_text())
        found[f"{place} version label"] = doc["metadata"]["labels"]["app.kubernetes.io/version"]
    wrong = {where: v for where, v in found.items() if v != version}
    assert not wrong, f"kubetune.__version__ is {version}; these disagree: {wrong}"


def test_base_install_needs_no_torch() -> None:
    """`pip install kubetune` (no extras) must give the CLI and SDK: no training or operator stack in its deps."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower() for d in deps}
    assert not names & set(HEAVY), f"base dependencies pull in {names & set(HEAVY)}"
    assert {"kubernetes", "pydantic", "pyyaml", "boto3"} <= names


# Commands a CLI-only install must run. Each runs in a fresh interpreter that fails the import of any heavy
# module, the way a machine without those packages would.
CLIENT_COMMANDS = [
    ["--help"],
    ["version", "--client"],
    ["validate", "examples/quickstart.yaml"],
    ["render", "examples/lora-1gpu.yaml"],
    ["crd"],
    ["completion", "bash"],
    ["get", "--help"],
    ["submit", "--help"],
    ["download", "--help"],
]

_BLOCK_HEAVY = """
import contextlib, io, json, sys, importlib.abc
HEAVY = {heavy!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
from kubetune.cli.main import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exc:  # --help
            codes.append(exc.code or 0)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({{"codes": codes, "loaded": loaded}}))
"""


def test_cli_runs_without_the_training_stack() -> None:
    """Each command runs in an interpreter that fails the import of any heavy module, as a CLI-only install would."""
    code = _BLOCK_HEAVY.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(CLIENT_COMMANDS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": "/nonexistent"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert dict(zip(map(" ".join, CLIENT_COMMANDS), result["codes"], strict=True)) == {
        " ".join(a): 0 for a in CLIENT_COMMANDS
    }, proc.stderr
    assert result["loaded"] == []
    assert "Traceback" not in proc.stderr


def test_version_without_a_cluster_prints_the_client_version_and_one_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "gone",
                "clusters": [{"name": "gone", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }
        )
    )
    for env in ({"KUBECONFIG": str(kubeconfig)}, {"KUBECONFIG": str(tmp_path / "missing")}):
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune.cli.main", "version", "--request-timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == f"Client Version: {kubetune.__version__}"
        assert len(lines) == 2 and lines[1].startswith("Cluster: "), proc.stdout
        assert "Traceback" not in proc.stderr and not proc.stderr.strip()


def test_version_reports_skew() -> None:
    from kubetune.cli.version import Versions

    v = Versions(
        crd="0.0.9", operators=[{"deployment": "kubetune-system/kubetune", "version": kubetune.__version__}]
    )
    assert v.skew() == [f"the CRD is 0.0.9, this client is {kubetune.__version__}"]
    assert Versions(crd=kubetune.__version__).skew() == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli.main", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kubetune" in proc.stdout and "_ARGCOMPLETE" in proc.stdout


def test_bash_completion_completes_subcommands(tmp_path: Path) -> None:
    """What bash does on `kubetune ver<TAB>`: runs kubetune with argcomplete's variables set; answers on fd 8."""
    line = "kubetune ver"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_IFS": "\n",
        "_ARGCOMPLETE_SHELL": "bash",
    }
    out = tmp_path / "completions"
    script = (
        f'"{sys.executable}" -c "import sys; from kubetune.cli.main import main; sys.exit(main())" 8>"{out}"'
    )
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [w.strip() for w in out.read_text().split("\n")] == ["version"]


def test_license_file_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def test_trainer_dockerfile_torch_pin_is_the_constraints_pin() -> None:
    """trainer_image/Dockerfile takes torch from its base and refuses a base whose torch is not its TORCH build
    argument; the constraints pin the same torch. A bump in one place and not the other would fail every build."""
    arg = next(
        line.split("=", 1)[1]
        for line in (ROOT / "trainer_image/Dockerfile").read_text().splitlines()
        if line.startswith("ARG TORCH=")
    )
    pins = [
        line.strip()
        for line in (ROOT / ".ci/constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    assert pins == [arg], f"trainer_image/Dockerfile ARG TORCH={arg}; .ci/constraints.txt pins {pins}"


def test_trainer_dockerfile_refuses_a_base_without_the_pinned_torch() -> None:
    """The Dockerfile's check of its BASE's torch (run as written, by this venv's Python, which has the pinned
    torch): passes for the pin, and for another pin or no torch fails with one line naming the base and the fix."""
    text = (ROOT / "trainer_image/Dockerfile").read_text()
    start = text.index("python -c 'import sys, importlib.metadata") + len("python -c '")
    code = text[start : text.index("' \\\n", start)].replace("\\\n", "")
    pin = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG TORCH="))

    def check(want: str, *flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, *flags, "-c", code, want, "example/base:1"]
        return subprocess.run(argv, capture_output=True, text=True)

    assert check(pin).returncode == 0
    bad = check("torch==2.10.0")
    assert bad.returncode == 1
    assert bad.stderr == (
        "BASE example/base:1 has torch 2.11.0; kubetune pins 2.10.0: use a BASE whose python3 has torch 2.10.0\n"
    )
    none = check(pin, "-S")  # no site-packages: a base without torch
    assert none.returncode == 1 and none.stderr.startswith("BASE example/base:1 has torch none;"), none.stderr


def test_dockerfiles_install_what_pyproject_declares() -> None:
    """The images install their dependencies from .ci/requirements.py (pyproject.toml's lists) before the
    source, and the package itself without dependencies after it."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from requirements import requirements  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(requirements("trainer")) == set(
        pyproject["dependencies"] + pyproject["optional-dependencies"]["trainer"]
    )
    for name, extra in (("operator_image", "operator"), ("trainer_image", "trainer")):
        text = (ROOT / name / "Dockerfile").read_text()
        assert f"python .ci/requirements.py {extra} >/tmp/requirements.txt" in text
        assert text.index("requirements.py") < text.index("COPY operator/kubetune") < text.index("--no-deps")
