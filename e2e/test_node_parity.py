"""The node agent stays faithful to the real node on the suite's core tests.

The e2e suite runs on the real node (containerd, runc, kubelet, kube-scheduler, CoreDNS: what CI runs) or on
the node agent (harness/node_agent.py: pods as local processes; the fast mode, and the only one on machines
without containerd or a private network namespace). The same test files run on both ("Two nodes, one suite",
e2e/suite/README.md), so wherever the agent behaved differently from a kubelet, a suite test would pass on one
node and fail on the other. This test makes CI see that: in a real-node session it runs the suite's core tests
(`-m core`: a 2-pod LoRA job to success, a SIGKILLed rank and the gang restart from its checkpoint, suspend and
resume) again on the node agent, in a session of their own, and requires that they pass there too. The same
assertions then hold on both nodes in one CI run; a change that makes the agent drift (or a test that only
the agent satisfies) fails here. In an agent session the core tests have run on the agent already and this
one skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness.mode import NODE_MODE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_the_node_agent_passes_the_suites_core_tests(tmp_path: Path) -> None:
    if NODE_MODE != "kubelet":
        pytest.skip("this session runs on the node agent: its core tests ran here already")
    if not os.access("/etc/hosts", os.W_OK):
        pytest.skip(
            "the node agent publishes pod DNS names in /etc/hosts and needs to write it (run as root)"
        )
    env = {**os.environ, "KUBETUNE_E2E_NODE": "agent", "KUBETUNE_E2E_WORKDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "e2e/suite", "-m", "core", "-rs"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 3 and " skipped" not in proc.stdout.splitlines()[-1], tail
