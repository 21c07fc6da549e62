"""Fuzzing the one validation path: valid manifests mutated by type, value, structure and encoding.

Properties: no exception escapes, every refusal is a non-zero exit with field-level problems and
no traceback, `validate` and `render` agree, and each example is checked in bounded time and memory.

CI runs a short pass; a long local run:

    KUBETUNE_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/test_fuzz_manifests.py
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.validation import validate_manifest
from kubetune.cli.main import main

EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SECONDS = 3.0  # CPU seconds per example, not wall time (a loaded machine must not fail it)
PEAK_BYTES = 64 * 1024 * 1024

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "fuzz", "labels": {"team": "ml"}},
    "spec": {
        "model": {"source": "s3://models/tiny", "dtype": "auto"},
        "dataset": {"train": "s3://data/train.jsonl", "format": "chat", "maxSeqLength": 64, "evalSplit": 0.1},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": 10,
            "learningRate": 0.001,
            "perDeviceBatchSize": 2,
            "globalBatchSize": 4,
            "seed": 7,
            "evalSteps": 5,
        },
        "distributed": {"nodes": 1, "procsPerNode": 2, "backend": "ddp"},
        "output": {"uri": "s3://out/fuzz", "mergeAdapter": True, "checkpointSteps": 5},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "affinity": {"nodeAffinity": {"preferred": [{"weight": 1}]}},
    },
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        ["16", "false", "eight", "s3:///x", "file://", "-1", "1e-4", ".inf", "a" * 300, "My_Job", "a/b"]
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        places = paths(doc)
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "stringify", "wrap", "duplicate-elsewhere"]))
        if op == "replace":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=12))] = draw(values)
        elif op == "stringify":
            parent[last] = str(parent[last])
        elif op == "wrap":
            parent[last] = [parent[last]]
        elif op == "duplicate-elsewhere" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["spec", "metadata", "lora", "x"]))] = copy.deepcopy(parent[last])
    return doc


def encoded(doc: Any, data: st.DataObject) -> bytes:
    """The manifest as a file, then damaged the way files get damaged."""
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()
    for _ in range(data.draw(st.integers(min_value=0, max_value=2))):
        pos = data.draw(st.integers(min_value=0, max_value=len(text)))
        damage = data.draw(
            st.sampled_from(
                [b"\t", b"\x00", b"\xff", b"&a ", b"*a", b"\n---\n", b": :", b"'", b"{", b"\n  spec: x\n"]
            )
            | st.binary(max_size=6)
        )
        cut = data.draw(st.integers(min_value=0, max_value=3))
        text = text[:pos] + damage + text[pos + cut :]
    return text


def bounded(fn: Any) -> Any:
    tracemalloc.start()
    started = time.process_time()
    try:
        return fn()
    finally:
        elapsed = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < SECONDS, f"took {elapsed:.2f} CPU seconds"
        assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


@FUZZ
@given(mutated())
def test_validation_never_raises_and_refusals_name_a_field(doc: Any) -> None:
    job, problems = bounded(lambda: validate_manifest(doc))
    assert (job is None) == bool(problems)
    for problem in problems:
        assert problem.field and problem.message and "\n" not in problem.message


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


@FUZZ
@given(mutated(), st.data())
def test_cli_entry_points_refuse_damaged_files_without_a_traceback(doc: Any, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_bytes(encoded(doc, data))
        results = {}
        for argv in (
            ["validate", str(path)],
            ["render", str(path)],
            ["run", str(path), "--dry-run", "--output", "s3://out/x"],
        ):
            rc, err = bounded(lambda argv=argv: cli(argv))
            assert rc in (0, 64), f"{argv[0]} exit {rc}: {err}"
            assert "Traceback" not in err and "internal error" not in err, err
            if rc:
                assert err.strip(), f"{argv[0]} refused without saying why"
            results[argv[0]] = rc
        assert results["validate"] == results["render"]
