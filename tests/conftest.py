"""Test order under tests/: the tests marked `e2e_build` (they need binaries that e2e/harness/build.sh compiles
from Go: helm, the control plane, Kueue) run after every other test here. On a cold machine .ci/run starts that
build in the background; a test that needs a binary waits for its component's lock, and run first (tests/bench
sorts before the rest) it held up the whole session, the unit tests included, until the Go build reached it.
Run last, the other tests use the time the build takes.

Under pytest-xdist (`make test` runs two workers) the work is shared out in groups: the whole e2e tree is one (one
control plane, its tests in their order, on one worker, first since it is the longest) and each module here is one
(its fixtures set up once). xdist's own `--dist loadgroup` cannot do this under pytest 9.2 (it renames node ids
through an attribute pytest no longer has), hence the scheduler below: xdist's LoadScope with these groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


# e2e modules that start a session of their own (a subprocess with its own cluster) and use nothing of the e2e
# session's: each is a group of its own, free to run on the other worker beside the session's tests
OWN_SESSION = ("e2e/test_node_parity.py",)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 (only under xdist)

    class Groups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "e2e" if nodeid.startswith("e2e/") and module not in OWN_SESSION else module

    return Groups(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [i for i, item in enumerate(items) if HERE in Path(str(item.fspath)).parents]
    order = sorted(
        (items[i] for i in ours), key=lambda item: item.get_closest_marker("e2e_build") is not None
    )
    for i, item in zip(ours, order, strict=True):  # the same places: tests outside tests/ (e2e/) keep theirs
        items[i] = item
    # the OWN_SESSION modules last: they need the Go binaries too, and wait for them on a cold machine
    own = [item for item in items if item.nodeid.split("::", 1)[0] in OWN_SESSION]
    items[:] = [item for item in items if item not in own] + own
