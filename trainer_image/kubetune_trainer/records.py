"""Dataset files -> records, one at a time, each with where it came from.

JSONL is read line by line with a size limit per line, CSV/TSV row by row, Parquet and
Arrow by record batch, so memory stays bounded by `maxRecordBytes` whatever the file's
size. JSON arrays cannot be streamed without a partial-document parser: they are read
whole and refused above JSON_ARRAY_LIMIT (convert them to JSONL).

A directory is a set of shards (every supported file under it, hidden ones skipped), or a
dataset written by `datasets`' `save_to_disk` (state.json naming its .arrow files; a
DatasetDict's `train` split), read with pyarrow alone.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import ExitCode

from kubetune_trainer.errors import TrainerError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
SUPPORTED = "JSONL (.jsonl), JSON arrays (.json), CSV (.csv), TSV (.tsv), Parquet (.parquet), Arrow (.arrow), a directory of these, or a `datasets` save_to_disk directory"
SAVE_TO_DISK_META = ("state.json", "dataset_info.json", "dataset_dict.json")
JSON_ARRAY_LIMIT = 1 << 30


@dataclass(frozen=True)
class Where:
    """A record's place: file, 1-based line where the format has lines, 0-based record index in the file."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file} line {self.line} (record {self.index})" if self.line is not None else f"{self.file} record {self.index}"


def refuse(message: str) -> TrainerError:
    return TrainerError(ExitCode.DATASET_INVALID, message)


def dataset_files(path: Path) -> list[Path]:
    """The files a dataset path stands for, in a stable order."""
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: train on its `train` split (or its only one)
        splits = list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise refuse(f"{path} is a DatasetDict with splits {splits} and none is `train`; point the path at one split's directory")
        path = path / split
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return [path / entry["filename"] for entry in state.get("_data_files", [])]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and p.name not in SAVE_TO_DISK_META
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise refuse(f"no dataset files under {path}; supported: {SUPPORTED}")
    return files


def iter_records(path: Path, max_record_bytes: int) -> Iterator[tuple[Where, Any]]:
    """Every record under `path` with its place. Records are whatever the file holds (the format checks the shape)."""
    for file in dataset_files(path):
        yield from iter_file(file, max_record_bytes)


def iter_file(path: Path, max_record_bytes: int) -> Iterator[tuple[Where, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            yield from _json(path, max_record_bytes)
        elif suffix in (".csv", ".tsv"):
            yield from _csv(path, max_record_bytes, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _parquet(path)
        elif suffix == ".arrow":
            yield from _arrow(path)
        else:
            raise refuse(f"dataset file {path.name}: unsupported type; use {SUPPORTED}")
    except TrainerError:
        raise
    except UnicodeDecodeError as exc:
        raise refuse(f"dataset file {path.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except Exception as exc:
        raise refuse(f"dataset file {path.name} cannot be read: {type(exc).__name__}: {exc}") from exc


def _first_char(path: Path) -> str:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode("utf-8", "replace")
    return ""


def _json(path: Path, limit: int) -> Iterator[tuple[Where, Any]]:
    if path.suffix.lower() == ".json" and _first_char(path) == "[":
        size = path.stat().st_size
        if size > JSON_ARRAY_LIMIT:
            raise refuse(f"{path.name} is a {size >> 20} MiB JSON array; convert it to JSONL (one record per line) to stream it")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise refuse(f"{path.name} line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}") from exc
        for index, row in enumerate(rows):
            yield Where(path.name, index), row
        return
    index = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(iter(lambda: handle.readline(limit + 1), b""), start=1):
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise refuse(
                    f"{path.name} line {line_no} (record {index}) is larger than spec.dataset.maxRecordBytes ({limit} bytes); "
                    "split the record or raise maxRecordBytes"
                )
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise refuse(f"{path.name} line {line_no} (record {index}) column {exc.colno}: not valid JSON: {exc.msg}") from exc
            except UnicodeDecodeError as exc:
                raise refuse(f"{path.name} line {line_no} (record {index}) is not UTF-8 text; save the file as UTF-8") from exc
            yield Where(path.name, index, line_no), record
            index += 1


def _csv(path: Path, limit: int, delimiter: str) -> Iterator[tuple[Where, Any]]:
    csv.field_size_limit(limit)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        index = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise refuse(f"{path.name} line {reader.line_num} (record {index}): {exc} (the limit is spec.dataset.maxRecordBytes)") from exc
            if None in row:
                raise refuse(
                    f"{path.name} line {reader.line_num} (record {index}) has {len(header) + len(row[None])} cells but the header has "
                    f"{len(header)}; quote cells that contain '{delimiter}'"
                )
            yield Where(path.name, index, reader.line_num), row  # missing cells are None, counted as invalid by the format
            index += 1


def _parquet(path: Path) -> Iterator[tuple[Where, Any]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield Where(path.name, index), row
            index += 1


def _arrow(path: Path) -> Iterator[tuple[Where, Any]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)  # what `datasets` writes
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Where(path.name, index), row
                index += 1
