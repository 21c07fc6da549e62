"""Test order under tests/: the tests marked `e2e_build` (they need binaries that e2e/harness/build.sh compiles
from Go: helm, the control plane, Kueue) run after every other test here. On a cold machine .ci/run starts that
build in the background; a test that needs a binary waits for its component's lock, and run first (tests/bench
sorts before the rest) it held up the whole session, the unit tests included, until the Go build reached it.
Run last, the other tests use the time the build takes."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [i for i, item in enumerate(items) if HERE in Path(str(item.fspath)).parents]
    order = sorted(
        (items[i] for i in ours), key=lambda item: item.get_closest_marker("e2e_build") is not None
    )
    for i, item in zip(ours, order, strict=True):  # the same places: tests outside tests/ (e2e/) keep theirs
        items[i] = item
