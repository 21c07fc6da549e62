"""The package's layers import downward only: api <- render <- controller, api <- status, and the SDK (client)
never imports the CLI or the controller. A fact two layers share (a name, a label) lives in kubetune.api, so
status never needs render and render never needs status."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "operator" / "kubetune"

FORBIDDEN = {
    "api": ("kubetune.render", "kubetune.status", "kubetune.controller", "kubetune.cli", "kubetune.client"),
    "render": ("kubetune.status", "kubetune.controller", "kubetune.cli", "kubetune.client"),
    "status": ("kubetune.render", "kubetune.controller", "kubetune.cli", "kubetune.client"),
    "controller": ("kubetune.cli", "kubetune.client"),
    "client": (
        "kubetune.cli",
        "kubetune.controller",
    ),  # the SDK runs `kubetune run` as a process, never imports it
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_above_it(layer):
    found = [
        f"{path.relative_to(PKG)} imports {module}"
        for path in sorted((PKG / layer).rglob("*.py"))
        for module in sorted(imports(path))
        if any(module == above or module.startswith(above + ".") for above in FORBIDDEN[layer])
    ]
    assert not found, "; ".join(found)
