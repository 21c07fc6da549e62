"""The trainer's shape: it imports only kubetune.api from the operator, and its functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "trainer_image" / "kubetune_trainer"
MAX_FUNCTION_LINES = 40


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(TRAINER.glob("*.py"))}


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):  # module level and inside functions alike
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_trainer_imports_only_kubetune_api_from_the_operator() -> None:
    outside = {
        f"{module}: {name}"
        for module, tree in _modules().items()
        for name in _imported(tree)
        if (name == "kubetune" or name.startswith("kubetune."))
        and not (name == "kubetune.api" or name.startswith("kubetune.api."))
    }
    assert not outside, sorted(outside)


def test_importing_the_trainer_loads_no_other_operator_code() -> None:
    """kubetune.api's own imports included: importing every trainer module pulls in nothing else of kubetune."""
    modules = [f"kubetune_trainer.{m}" for m in _modules() if m != "__main__"] + ["kubetune_trainer.__main__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in sys.modules if n.startswith('kubetune.') and not n.startswith('kubetune.api')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_no_trainer_function_is_longer_than_40_lines() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_test_hooks_are_read_only_by_the_debug_seam() -> None:
    """Every KUBETUNE_DEBUG_* variable is read in debug.py (DebugHooks) and nowhere else in the trainer."""
    elsewhere = [
        p.name
        for p in sorted(TRAINER.glob("*.py"))
        if p.name != "debug.py" and "KUBETUNE_DEBUG_" in p.read_text()
    ]
    assert not elsewhere, elsewhere
