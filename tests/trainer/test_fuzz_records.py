"""Fuzzing dataset records: valid JSONL and CSV files damaged by type, structure and encoding.

Every file either tokenizes or is refused as DatasetInvalid (66) with the file named; nothing
else escapes, and a record over maxRecordBytes is refused without being read whole.

    KUBETUNE_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/trainer/test_fuzz_records.py   # a long local run
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.errors import TrainerError

EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
MAX_RECORD = 4096

CHAT = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "1 2"}]}
leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
records = st.one_of(
    st.just(CHAT),
    st.builds(lambda v: {"messages": v}, values),
    st.builds(
        lambda role, content: {
            "messages": [{"role": "user", "content": "x"}, {"role": role, "content": content}]
        },
        st.text(max_size=10),
        values,
    ),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, values, values),
    values,
)


def damaged(text: bytes, data_: st.DataObject) -> bytes:
    for _ in range(data_.draw(st.integers(min_value=0, max_value=2))):
        pos = data_.draw(st.integers(min_value=0, max_value=len(text)))
        text = (
            text[:pos]
            + data_.draw(
                st.sampled_from([b"\x00", b"\xff\xfe", b"\n", b",", b'"', b"{"]) | st.binary(max_size=5)
            )
            + text[pos:]
        )
    return text


def tokenize(path: Path, tokenizer: Any) -> None:
    spec = DatasetSpec.model_validate(
        {"train": f"/{path.name}", "maxRecordBytes": MAX_RECORD, "maxInvalidFraction": 0.5}
    )
    tracemalloc.start()
    try:
        data.tokenize_source(path, path.name, spec.format, spec.fields, spec, tokenizer)
    except TrainerError as exc:
        assert exc.exit_code == ExitCode.DATASET_INVALID, exc.message
        assert path.name in exc.message, exc.message  # every data error names the file (and the line)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024


@FUZZ
@given(st.lists(records, min_size=1, max_size=6), st.data())
def test_damaged_jsonl_tokenizes_or_is_refused_as_dataset_invalid(
    tokenizer: Any, rows: list[Any], data_: st.DataObject
) -> None:
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(damaged(text, data_))
        tokenize(path, tokenizer)


@FUZZ
@given(st.lists(st.lists(st.text(max_size=12), min_size=0, max_size=4), min_size=1, max_size=6), st.data())
def test_damaged_csv_tokenizes_or_is_refused_as_dataset_invalid(
    tokenizer: Any, rows: list[list[str]], data_: st.DataObject
) -> None:
    lines = ["prompt,completion"] + [",".join(json.dumps(c) for c in row) for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        path.write_bytes(damaged("\n".join(lines).encode(), data_))
        tokenize(path, tokenizer)
