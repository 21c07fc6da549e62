"""The e2e suite is one suite for two nodes (the real kubelet node and the fast node agent): its tests ask for
`node`, whichever runs, never for one of them by name, so every suite test can run, and be compared, on both;
and the core tests that e2e/test_node_parity.py runs on the agent in a real-node CI session are marked."""

from __future__ import annotations

import ast
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "e2e" / "suite"
ONE_NODE_ONLY = {"node_agent", "kubelet_node"}


def suite_tests() -> dict[str, ast.FunctionDef]:
    return {
        f"{path.name}::{node.name}": node
        for path in sorted(SUITE.glob("test_*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_suite_tests_ask_for_the_node_not_for_one_kind_of_node():
    bound = [
        f"{name} asks for {arg.arg}"
        for name, fn in suite_tests().items()
        for arg in fn.args.args
        if arg.arg in ONE_NODE_ONLY
    ]
    assert not bound, "; ".join(bound) + ": use the `node` fixture (e2e/conftest.py)"


def test_the_core_tests_are_marked():
    source = "\n".join(p.read_text() for p in SUITE.glob("test_*.py"))
    assert source.count("pytest.mark.core") >= 3
