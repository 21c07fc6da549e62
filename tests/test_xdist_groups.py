"""The groups `make test`'s two pytest-xdist workers share out (tests/conftest.py `groups`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_conftest():  # by path: `import conftest` gets whichever conftest module was imported first
    spec = importlib.util.spec_from_file_location("tests_conftest_groups", HERE / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_e2e_tree_is_one_group_but_its_own_group_modules_and_each_test_module_is_one():
    conftest = load_conftest()
    own = conftest.OWN_GROUP
    nodeids = [
        "e2e/test_local_cluster.py::test_tutorial_as_written",
        "e2e/suite/test_happy.py::test_happy_path[lora]",
        "e2e/suite/test_happy.py::test_happy_path[full]",
        "tests/test_crd.py::test_a",
        "tests/test_crd.py::test_b",
        "tests/test_uris.py::test_c",
        *(f"{module}::test_x" for module in own),
    ]
    got = conftest.groups(nodeids)
    assert [got[n] for n in nodeids] == [
        "e2e", "e2e", "e2e", "tests/test_crd.py", "tests/test_crd.py", "tests/test_uris.py", *own,
    ]  # fmt: skip


def test_a_modules_tests_moved_to_the_end_are_a_later_group_of_their_own():
    """The e2e_build tests come after every other test (pytest_collection_modifyitems): queued there, not at their
    module's place, they no longer hold a worker while the Go build runs."""
    conftest = load_conftest()
    nodeids = [
        "tests/bench/test_bench_smoke.py::test_fast",
        "tests/test_crd.py::test_a",
        "tests/bench/test_bench_smoke.py::test_kueue_scale_smoke",
        "tests/test_chart.py::test_promtool",
    ]
    got = conftest.groups(nodeids)
    assert got == {
        "tests/bench/test_bench_smoke.py::test_fast": "tests/bench/test_bench_smoke.py",
        "tests/test_crd.py::test_a": "tests/test_crd.py",
        "tests/bench/test_bench_smoke.py::test_kueue_scale_smoke": "tests/bench/test_bench_smoke.py#1",
        "tests/test_chart.py::test_promtool": "tests/test_chart.py",
    }
    assert conftest.groups(nodeids[2:3]) == {
        nodeids[2]: "tests/bench/test_bench_smoke.py"
    }  # alone: no earlier run
