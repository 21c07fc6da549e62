"""`kubetune suspend|resume|delete NAME...`: one SDK call per name, and kubectl's line for each. The SDK calls
themselves run against a real API server in e2e/suite/test_sdk.py; here a recorder stands in for the Client."""

from __future__ import annotations

import pytest
from kubetune.cli import lifecycle
from kubetune.cli.main import SUBCOMMANDS, main


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def suspend(self, name: str) -> None:
        self.calls.append(("suspend", name))

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))


@pytest.mark.parametrize(
    ("command", "done"), [("suspend", "suspended"), ("resume", "resumed"), ("delete", "deleted")]
)
def test_each_name_gets_one_call_and_one_line(command: str, done: str, monkeypatch, capsys) -> None:
    client = Recorder()
    monkeypatch.setattr(lifecycle, "client_from", lambda args: client)
    assert main([command, "a", "b", "-n", "ml"]) == 0
    assert client.calls == [(command, "a"), (command, "b")]
    assert capsys.readouterr().out == f"finetunejob.kubetune.io/a {done}\nfinetunejob.kubetune.io/b {done}\n"


def test_every_lifecycle_subcommand_has_an_action() -> None:
    routed = {name for name, (module, _) in SUBCOMMANDS.items() if module == "kubetune.cli.lifecycle"}
    assert routed == set(lifecycle.ACTIONS) == {"suspend", "resume", "delete"}
