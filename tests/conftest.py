"""Test order under tests/: the tests marked `e2e_build` (they need binaries that e2e/harness/build.sh compiles
from Go: helm, the control plane, Kueue) run after every other test here. On a cold machine .ci/run starts that
build in the background; a test that needs a binary waits for its component's lock, and run first (tests/bench
sorts before the rest) it held up the whole session, the unit tests included, until the Go build reached it.
Run last, the other tests use the time the build takes.

Under pytest-xdist (`make test` runs two workers) the work is shared out in groups: the whole e2e tree is one (one
control plane, its tests in their order, on one worker, first since it is the longest) and each module here is one
(its fixtures set up once). xdist's own `--dist loadgroup` cannot do this under pytest 9.2 (it renames node ids
through an attribute pytest no longer has), hence the scheduler below: xdist's LoadScope with these groups.

`KUBETUNE_TEST_TIMELINE=<file>`: one JSON line per test phase (worker, node id, phase, start, stop, outcome), written
by the controlling process; what e2e/README.md's CI figures per worker come from."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
TIMELINE = os.environ.get("KUBETUNE_TEST_TIMELINE")


# e2e modules that are each a group of their own, queued last (longest first), so that the worker whose other
# groups run out first takes them, beside the e2e tree on the other: test_multinode runs on the e2e session of
# the worker that takes it (on the tests/ worker a second cluster of its own: its fixtures start one, as when the
# module is run alone), test_node_parity starts a session of its own (a subprocess) and uses nothing of the
# e2e session's. Both need the Go binaries, which a cold machine has by then.
OWN_GROUP = ("e2e/suite/test_multinode.py", "e2e/test_node_parity.py")


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def groups(nodeids: Sequence[str]) -> dict[str, str]:
    """Each test's xdist group, from the order of collection (pytest_collection_modifyitems below): the e2e tree
    one group ("e2e"), but for the OWN_GROUP modules, a group each; under tests/ a group per run of consecutive
    tests of one module. A module's `e2e_build` tests, moved after every other test, are a later run: a group
    of their own, queued after the other modules' groups, instead of holding their worker at the module's place
    until the Go build has reached their binary (the Kueue scale bench waited 8 minutes there, cold)."""
    out: dict[str, str] = {}
    runs: dict[str, int] = {}
    last = None
    for nodeid in nodeids:
        module = module_of(nodeid)
        if nodeid.startswith("e2e/") and module not in OWN_GROUP:
            out[nodeid], last = "e2e", None
            continue
        if module != last:
            runs[module] = runs.get(module, -1) + 1
            last = module
        out[nodeid] = f"{module}#{runs[module]}" if runs[module] else module
    return out


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 (only under xdist)

    class Groups(LoadScopeScheduling):  # type: ignore[misc]
        scopes: dict[str, str] = {}

        def schedule(self) -> None:
            if self.collection is None and self.collection_is_completed and self.registered_collections:
                self.scopes = groups(next(iter(self.registered_collections.values())))
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            return self.scopes.get(nodeid) or groups([nodeid])[nodeid]

    return Groups(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [i for i, item in enumerate(items) if HERE in Path(str(item.fspath)).parents]
    order = sorted(
        (items[i] for i in ours), key=lambda item: item.get_closest_marker("e2e_build") is not None
    )
    for i, item in zip(ours, order, strict=True):  # the same places: tests outside tests/ (e2e/) keep theirs
        items[i] = item
    # the OWN_GROUP modules last, in OWN_GROUP's order: they need the Go binaries too (a cold machine's wait)
    own = sorted(
        (item for item in items if module_of(item.nodeid) in OWN_GROUP),
        key=lambda item: OWN_GROUP.index(module_of(item.nodeid)),
    )
    items[:] = [item for item in items if item not in own] + own


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """KUBETUNE_TEST_TIMELINE: under xdist the controlling process gets every worker's reports here."""
    if not TIMELINE or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    node = getattr(report, "node", None)
    worker = node.gateway.id if node is not None else "main"
    line = {"worker": worker, "nodeid": report.nodeid, "when": report.when, "start": report.start,
            "stop": report.stop, "outcome": report.outcome}  # fmt: skip
    with open(TIMELINE, "a") as out:
        out.write(json.dumps(line) + "\n")
