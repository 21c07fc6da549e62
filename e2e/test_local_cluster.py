"""`make cluster` and the tutorial in docs/local-cluster.md, run as written.

The tutorial's commands are the fenced blocks marked `<!-- tutorial -->` in the Markdown; the test joins
them, in order, into one bash script and runs it from the repository root against a fresh `make cluster`
(its state in a temporary KUBETUNE_CLUSTER_DIR), so the page cannot drift from what works. Then it checks
that `make cluster-down` left nothing: no process, mount or cgroup of the cluster, no state directory.

It runs first among the e2e tests (conftest.py orders it so): its cluster then takes the cached containerd
root with the images already imported, which the session's own node holds once it has started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import local_cluster
from harness.netns import hierarchies

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "local-cluster.md"
MAKEFLAGS = "-o .venv/.installed"  # the session's venv is installed: `make cluster` must not reinstall it


def tutorial_blocks(doc: Path = DOC) -> list[str]:
    """The bodies of the ```sh blocks that follow a `<!-- tutorial -->` line, in order."""
    blocks = re.findall(r"^<!-- tutorial -->\n```sh\n(.*?)^```$", doc.read_text(), flags=re.M | re.S)
    assert blocks, f"{doc} has no <!-- tutorial --> blocks"
    return blocks


def test_tutorial_blocks_are_found() -> None:
    script = "\n".join(tutorial_blocks())
    for command in (
        "make cluster\n",
        "kubectl apply -f examples/local-cluster.yaml",
        "kubetune download",
        "make cluster-down",
    ):
        assert command in script


def _run_up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.local_cluster", "up"],
        cwd=REPO / "e2e",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_root_one_line_and_nothing_started(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("checks the refusal by dropping root, so it must start as root")
    d = tmp_path / "state"
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "harness.local_cluster", "up"],
        cwd=REPO / "e2e",
        env={**os.environ, "KUBETUNE_CLUSTER_DIR": str(d)},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r
    assert r.stderr.strip().splitlines() == [
        "make cluster: needs root (the node runs containerd and runc in a private network + mount namespace): "
        "run it as root"
    ]
    assert not d.exists()


def test_missing_tool_one_line_and_nothing_started(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root is checked first")
    d = tmp_path / "state"
    r = _run_up(
        {**os.environ, "KUBETUNE_CLUSTER_DIR": str(d), "KUBETUNE_E2E_KUBECTL": str(tmp_path / "no-kubectl")}
    )
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make cluster: missing kubectl"), lines
    assert not d.exists()


def _cluster_traces(d: Path) -> list[str]:
    """Processes, mounts and cgroups that belong to the cluster whose state is under `d`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(d) in cmd or cwd.startswith(str(d)):
            found.append(f"process {proc.name}: {cmd[:120]}")
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(d) in line
    ]
    return found


def _e2e_cgroups() -> set[str]:
    return {str(p) for h in hierarchies() for p in h.glob("kubetune-e2e-*")}


@pytest.mark.slow
def test_tutorial_as_written(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("make cluster needs root")
    try:
        local_cluster.preflight()
    except SystemExit as e:
        pytest.skip(str(e))
    d = tmp_path / "state"
    cgroups_before = _e2e_cgroups()
    env = {
        **os.environ,
        "KUBETUNE_CLUSTER_DIR": str(d),
        "MAKEFLAGS": MAKEFLAGS,
    }
    *blocks, last = tutorial_blocks()
    assert "make cluster-down" in last

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", "set -euxo pipefail\n" + script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=2400,
        )

    t0 = time.monotonic()
    log = ""
    try:
        first = r = bash("\n".join(blocks))
        # a second `make cluster` while it runs: says so, prints its exports, starts nothing
        again = bash("make cluster") if r.returncode == 0 else r
        if r.returncode == 0:
            r = bash(last)
    finally:
        if (d / "cluster.log").exists():
            log = (d / "cluster.log").read_text(errors="replace")[-4000:]
        subprocess.run(
            [sys.executable, "-m", "harness.local_cluster", "down"], cwd=REPO / "e2e", env=env, timeout=300
        )
    print(f"tutorial: {time.monotonic() - t0:.0f}s", file=sys.stderr)
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-6000:]}\n{log}"
    # the job ran to Succeeded, and its model was downloaded (checked against its manifest) and generated
    assert "condition met" in first.stdout and re.search(r"local-cluster\s+Succeeded", first.stdout), (
        first.stdout
    )
    assert re.search(r"^answer: \S", first.stdout, flags=re.M), first.stdout[-3000:]
    assert again.returncode == 0 and "a cluster is already running" in again.stderr, again
    assert f"export KUBECONFIG={d / 'kubeconfig'}" in again.stdout, again
    # nothing of the cluster left: its state directory, processes, mounts, cgroups
    assert not d.exists()
    deadline = time.monotonic() + 30  # shims reparented to init are reaped a few seconds later
    while (traces := _cluster_traces(d)) and time.monotonic() < deadline:
        time.sleep(1)
    assert traces == []
    assert _e2e_cgroups() - cgroups_before == set()
    assert not (REPO / "local-cluster-out").exists()
