"""Condition reasons are constants (status.conditions.Reason), each with exactly one message template."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest
from kubetune.api import contract
from kubetune.status import conditions
from kubetune.status.conditions import MESSAGES, Reason, reason_message

PKG = Path(__file__).resolve().parent.parent / "operator" / "kubetune"


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_reason_has_one_template():
    assert set(MESSAGES) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_each_template_renders_from_its_own_fields(reason):
    fields = {name: f"<{name}>" for name in placeholders(MESSAGES[reason])}
    message = reason_message(reason, **fields)
    assert "{" not in message and all(v in message for v in fields.values())
    if fields:
        with pytest.raises(KeyError):  # a call that forgets a field is a bug, not a message with braces in it
            reason_message(reason)


def test_an_unknown_reason_is_an_error_not_a_placeholder():
    with pytest.raises(ValueError):
        reason_message("SomethingElse")  # type: ignore[arg-type]
    assert f"{Reason.GANG_RESTARTING}" == str(Reason.GANG_RESTARTING) == "GangRestarting"


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    exported = {  # __all__ lists names, not reasons
        id(c) for node in ast.walk(tree) if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets) for c in ast.walk(node.value)
    }  # fmt: skip
    skip = docstrings | exported
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]  # fmt: skip


def test_no_reason_is_written_as_a_bare_string():
    values = {r.value for r in Reason}
    found = [
        f"{path.relative_to(PKG)}:{line}: {value!r}"
        for path in sorted(PKG.rglob("*.py"))
        if path
        not in (Path(conditions.__file__), Path(contract.__file__))  # the enum; the trainer's exit reasons
        for line, value in _string_literals(path)
        if value in values
    ]
    assert not found, "use status.conditions.Reason: " + "; ".join(found)
