"""Dataset files -> records, one at a time, each with where it came from.

Every reader is streamed, so memory stays bounded by `maxRecordBytes` whatever the file's size:
JSONL line by line with a size limit per line, JSON arrays element by element (ijson; an element
over the limit is refused before it is read whole), CSV/TSV row by row, plain text (.txt, format
`text`) one document at a time, Parquet and Arrow by record batch. A UTF-8 byte-order mark at the
start of a JSON, JSONL, CSV or text file is accepted.

Line- and array-based files may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`: `train.jsonl.gz`,
`corpus.txt.zst`): they are decompressed as they are read, the limits apply to the decompressed
bytes, and a file that expands more than MAX_EXPANSION times (past EXPANSION_FLOOR bytes) is
refused as a decompression bomb.

A `.txt` file holds documents separated by blank lines (one or more empty lines end a document);
each document is a record `{"text": ...}` whose line is the document's first line.

Every string read from JSON is checked for lone UTF-16 surrogates (an escaped `\\ud800`, or the
CESU-8 bytes that Python's JSON decoder lets through): such a record is refused as bad data with its
file, line and record, never passed to the tokenizer.

A directory is a set of shards (every file under it, hidden ones skipped): each is read, or, when it
is not a dataset file, refused by name; only documentation (README, LICENSE, *.md) and `datasets`'
metadata files are passed over. A dataset written by `datasets`' `save_to_disk` (state.json naming its
.arrow files) is read with pyarrow alone; a DatasetDict (dataset_dict.json) trains on its `train`
split, and a split is chosen with a fragment: `path#validation`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubetune.api.contract import ExitCode

from kubetune_trainer.errors import TrainerError

TEXT_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}
BINARY_TYPES = {".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = (
    "JSONL (.jsonl), JSON arrays (.json), CSV (.csv), TSV (.tsv), plain text (.txt, format text), Parquet (.parquet), "
    "Arrow (.arrow), any of the text types compressed (.gz, .bz2, .xz, .zst), a directory of these, or a `datasets` "
    "save_to_disk directory"
)
SAVE_TO_DISK_META = ("state.json", "dataset_info.json", "dataset_dict.json")
DOC_NAMES = ("readme", "license", "licence", "citation", "notice", "changelog")
MAX_EXPANSION = 200  # decompressed / compressed bytes; text data compresses 3-20x, a bomb 1000x and more
EXPANSION_FLOOR = 256 << 20  # small files may expand as they like
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPLIT = re.compile(r"#([A-Za-z0-9][A-Za-z0-9_.\-]*)$")

# What to do with a file type kubetune does not read.
CONVERSIONS = {
    ".zip": "extract it (unzip) and point at the extracted folder",
    ".tar": "extract it (tar xf) and point at the extracted folder",
    ".tgz": "extract it (tar xzf) and point at the extracted folder",
    ".7z": "extract it and point at the extracted folder",
    ".rar": "extract it and point at the extracted folder",
    ".xlsx": "save it as CSV (one header row)",
    ".xls": "save it as CSV (one header row)",
    ".ods": "save it as CSV (one header row)",
    ".lz4": "decompress it (lz4 -d) or recompress it as .zst or .gz",
    ".md": "convert it to .txt (documents separated by blank lines) or JSONL with a text field",
    ".html": "convert it to .txt (documents separated by blank lines) or JSONL with a text field",
    ".pdf": "extract its text to .txt (documents separated by blank lines) or JSONL with a text field",
}


@dataclass(frozen=True)
class Where:
    """A record's place: file, 1-based line where the record starts (where the format has lines), 0-based record index in the file."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return (
            f"{self.file} line {self.line} (record {self.index})"
            if self.line is not None
            else f"{self.file} record {self.index}"
        )


def refuse(message: str) -> TrainerError:
    return TrainerError(ExitCode.DATASET_INVALID, message)


# ------------------------------------------------------------------- paths and splits


def split_fragment(uri: str) -> tuple[str, str | None]:
    """`path#split` -> (path, split); a URI without a fragment -> (uri, None)."""
    match = _SPLIT.search(uri)
    return (uri[: match.start()], match.group(1)) if match else (uri, None)


def with_split(path: Path, split: str | None) -> Path:
    """A local path that carries a split choice to `dataset_files` (see `locate`)."""
    return Path(f"{path}#{split}") if split else path


def locate(path: Path) -> tuple[Path, str | None]:
    """(the path on disk, the split asked for) of a path made by `with_split`."""
    if not path.exists():
        base, split = split_fragment(str(path))
        if split is not None:
            return Path(base), split
    return path, None


def dict_splits(path: Path) -> list[str] | None:
    """The splits of a DatasetDict root (dataset_dict.json), None for anything else."""
    meta = path / "dataset_dict.json"
    if not meta.is_file():
        return None
    try:
        splits = json.loads(meta.read_text(encoding="utf-8")).get("splits")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise refuse(
            f"{meta} is not a valid `datasets` dataset_dict.json ({exc}); save the dataset again or point at one split's directory"
        ) from exc
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise refuse(
            f"{meta} has no list of splits; save the dataset again or point at one split's directory"
        )
    return splits


def dataset_files(path: Path) -> list[Path]:
    """The files a dataset path stands for, in a stable order."""
    path, split = locate(path)
    if split is not None and not path.is_dir():
        raise refuse(
            f"{path}#{split}: a split can only be chosen in a `datasets` DatasetDict directory, and {path} is not one"
        )
    if path.is_file():
        return [path]
    path = _split_dir(path, split)
    if (path / "state.json").is_file():
        return _saved_files(path)
    files: list[Path] = []
    foreign: list[Path] = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if p.name in SAVE_TO_DISK_META or p.name.lower().startswith(DOC_NAMES) or p.suffix.lower() == ".md":
            continue
        (files if _file_type(p)[0] else foreign).append(p)
    if foreign:
        first = foreign[0]
        raise refuse(
            f"{path}: {len(foreign)} file(s) that are not dataset files, first {first.relative_to(path)}: {_conversion(first)}; "
            "convert or remove them (a shard is never skipped)"
        )
    if not files:
        raise refuse(f"no dataset files under {path}; supported: {SUPPORTED}")
    return files


def _split_dir(path: Path, split: str | None) -> Path:
    """A DatasetDict directory: its split's directory (the one named, else `train` or its only one); any other
    directory as it is (naming a split there is refused)."""
    splits = dict_splits(path)
    if splits is None:
        if split is not None:
            raise refuse(
                f"{path}#{split}: a split can only be chosen in a `datasets` DatasetDict directory (dataset_dict.json), and {path} is not one"
            )
        return path
    if split is None:
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise refuse(
                f"{path} is a DatasetDict with splits {splits} and none is `train`; choose one with {path}#<split>"
            )
    elif split not in splits:
        raise refuse(
            f"{path} is a DatasetDict with splits {splits}, not {split!r}; choose one with {path}#<split>"
        )
    return path / split


def _saved_files(path: Path) -> list[Path]:
    """The .arrow files a save_to_disk directory's state.json names (each must be there)."""
    meta = path / "state.json"
    try:
        state = json.loads(meta.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise refuse(
            f"{meta} is not a valid `datasets` state.json ({detail}); save the dataset again with save_to_disk"
        ) from exc
    files = [path / str(name) for name in names]
    for f in files:
        if not f.is_file() or f.resolve().parent != path.resolve():
            raise refuse(
                f"{meta} names {f.name}, which is not a file in {path}; save the dataset again with save_to_disk"
            )
    if not files:
        raise refuse(f"{meta} names no data files; save the dataset again with save_to_disk")
    return files


def _file_type(path: Path) -> tuple[str | None, str | None]:
    """(data type, compression suffix) of a file kubetune reads; (None, ...) for anything else."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    inner = Path(name[: -len(compression)] if compression else name).suffix
    if compression is None and inner in BINARY_TYPES:
        return BINARY_TYPES[inner], None
    return TEXT_TYPES.get(inner), compression


def _conversion(path: Path) -> str:
    """Why a file is not read, and the conversion that works."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    inner = Path(name[: -len(compression)] if compression else name).suffix
    if compression and inner in BINARY_TYPES:
        return f"{inner} files compress inside themselves: decompress it to plain {inner}"
    if compression and inner == ".tar":
        return "a compressed tar archive: extract it (tar xf) and point at the extracted folder"
    suffix = inner or "(no suffix)"
    return f"{suffix} is not a type kubetune reads: " + CONVERSIONS.get(
        inner, f"convert it to JSONL (one JSON object per line); supported: {SUPPORTED}"
    )


# ------------------------------------------------------------------- reading


def iter_records(path: Path, max_record_bytes: int) -> Iterator[tuple[Where, Any]]:
    """Every record under `path` with its place. Records are whatever the file holds (the format checks the shape)."""
    for file in dataset_files(path):
        yield from iter_file(file, max_record_bytes)


def iter_file(path: Path, max_record_bytes: int) -> Iterator[tuple[Where, Any]]:
    kind, compression = _file_type(path)
    if kind is None:
        raise refuse(f"dataset file {path.name}: {_conversion(path)}")
    where: list[Where] = []  # the last record read, for errors raised by the stream itself
    try:
        if kind in ("parquet", "arrow"):
            yield from _parquet(path) if kind == "parquet" else _arrow(path)
            return
        for place, record in _text_records(path, kind, compression, max_record_bytes):
            where[:] = [place]
            yield place, record
    except TrainerError:
        raise
    except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        after = f" after {where[0]}" if where else " before its first record"
        if compression:
            raise refuse(
                f"dataset file {path.name} is damaged{after}: {type(exc).__name__}: {exc}; check the download (e.g. {_test_command(compression)})"
            ) from exc
        raise refuse(f"dataset file {path.name} cannot be read{after}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise refuse(f"dataset file {path.name} cannot be read: {type(exc).__name__}: {exc}") from exc


def _test_command(compression: str) -> str:
    return {".gz": "gzip -t", ".bz2": "bzip2 -t", ".xz": "xz -t", ".zst": "zstd -t"}[compression] + " FILE"


def _text_records(path: Path, kind: str, compression: str | None, limit: int) -> Iterator[tuple[Where, Any]]:
    if kind == "json" and _first_char(path, compression) == "[":
        with open_stream(path, compression) as stream:
            yield from _json_array(stream, path.name, limit)
        return
    with open_stream(path, compression) as stream:
        if kind in ("jsonl", "json"):
            yield from _jsonl(stream, path.name, limit)
        elif kind in ("csv", "tsv"):
            yield from _csv(stream, path.name, limit, "\t" if kind == "tsv" else ",")
        else:
            yield from _txt(stream, path.name, limit)


class _Expansion(io.RawIOBase):
    """A decompressing stream that refuses to expand more than MAX_EXPANSION times its file."""

    def __init__(self, inner: IO[bytes], name: str, compressed: int):
        self.inner, self.name_, self.total = inner, name, 0
        self.allowed = max(EXPANSION_FLOOR, MAX_EXPANSION * compressed)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.total += len(data)
        if self.total > self.allowed:
            raise refuse(
                f"dataset file {self.name_} expands to more than {self.allowed >> 20} MiB ({MAX_EXPANSION}x its size): refused as a "
                "decompression bomb; if it is genuine, decompress it and point at the plain file"
            )
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def open_stream(path: Path, compression: str | None) -> io.BufferedReader:
    """The file's (decompressed) bytes as a buffered stream."""
    if compression is None:
        return open(path, "rb")  # noqa: SIM115 (closed by the caller's with)
    inner: Any
    if compression == ".gz":
        inner = gzip.open(path, "rb")
    elif compression == ".bz2":
        inner = bz2.open(path, "rb")
    elif compression == ".xz":
        inner = lzma.open(path, "rb")
    else:
        import zstandard

        inner = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    return io.BufferedReader(_Expansion(inner, path.name, path.stat().st_size), buffer_size=1 << 16)


def _first_char(path: Path, compression: str | None) -> str:
    with open_stream(path, compression) as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            stripped = chunk.removeprefix(BOM).lstrip()
            if stripped:
                return stripped[:1].decode("utf-8", "replace")
    return ""


def check_text(record: Any, where: Where) -> None:
    """Refuse a record with a lone UTF-16 surrogate in any string (keys included): it is not text."""
    stack = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if (bad := _SURROGATE.search(value)) is not None:
                raise refuse(
                    f"{where}: holds a lone UTF-16 surrogate (U+{ord(bad.group()):04X}, an escaped \\u{ord(bad.group()):04x} or CESU-8 "
                    f"bytes) near {value[max(0, bad.start() - 20) : bad.start()]!r}: not valid Unicode text; fix or remove the record"
                )
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _jsonl(stream: IO[bytes], name: str, limit: int) -> Iterator[tuple[Where, Any]]:
    index = 0
    for line_no, raw in enumerate(iter(lambda: stream.readline(limit + 1), b""), start=1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise refuse(
                f"{name} line {line_no} (record {index}) is larger than spec.dataset.maxRecordBytes ({limit} bytes); "
                "split the record or raise maxRecordBytes"
            )
        if line_no == 1:
            raw = raw.removeprefix(BOM)
        if not raw.strip():
            continue
        where = Where(name, index, line_no)
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise refuse(f"{where} column {exc.colno}: not valid JSON: {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise refuse(
                f"{where} is not UTF-8 text (byte {exc.start} of the line); save the file as UTF-8"
            ) from exc
        check_text(record, where)
        yield where, record
        index += 1


class _Metered:
    """A byte stream for ijson that skips a leading BOM and refuses an element over the record limit."""

    def __init__(self, stream: IO[bytes], name: str, limit: int):
        self.stream, self.name, self.limit = stream, name, limit
        self.total = self.mark = 0
        self.index = 0
        self.first = True

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.first and data:  # (ijson reads 0 bytes first, to tell bytes from text)
            data, self.first = data.removeprefix(BOM), False
        self.total += len(data)
        if self.total - self.mark > self.limit + CHUNK:
            raise refuse(
                f"{self.name} record {self.index} (a JSON array element) is larger than spec.dataset.maxRecordBytes ({self.limit} bytes); "
                "split the record or raise maxRecordBytes"
            )
        return data


CHUNK = 1 << 16  # bytes ijson reads at a time


def _json_array(stream: IO[bytes], name: str, limit: int) -> Iterator[tuple[Where, Any]]:
    import ijson

    meter = _Metered(stream, name, limit)
    items = ijson.items(meter, "item", use_float=True, buf_size=CHUNK)
    while True:
        where = Where(name, meter.index)
        try:
            record = next(items)
        except StopIteration:
            return
        except ijson.JSONError as exc:
            raise refuse(f"{name}: not a valid JSON array at or after record {meter.index}: {exc}") from exc
        except (
            UnicodeError
        ) as exc:  # bytes that are not UTF-8, or an escaped lone surrogate (ijson cannot hold it)
            raise refuse(
                f"{name} record {meter.index}: not valid UTF-8 text (bytes that are not UTF-8, or a lone UTF-16 surrogate such as \\ud800); "
                "fix or remove the record, and save the file as UTF-8"
            ) from exc
        check_text(record, where)
        yield where, record
        meter.index += 1
        meter.mark = meter.total


class _BadLine(Exception):
    def __init__(self, number: int, why: str):
        super().__init__(why)
        self.number, self.why = number, why


class _Lines:
    """The lines of a byte stream decoded one at a time (so an error names its line), numbered, with the
    first non-blank one since `restart()` remembered (where a record that spans lines starts)."""

    def __init__(self, stream: IO[bytes], limit: int):
        self.stream, self.limit, self.number = stream, limit, 0
        self.first: int | None = None

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.stream.readline(self.limit + 1)
        if not raw:
            raise StopIteration
        self.number += 1
        if len(raw) > self.limit and not raw.endswith(b"\n"):
            raise _BadLine(
                self.number,
                f"is larger than spec.dataset.maxRecordBytes ({self.limit} bytes); split the record or raise maxRecordBytes",
            )
        try:
            line = (raw.removeprefix(BOM) if self.number == 1 else raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadLine(self.number, "is not UTF-8 text; save the file as UTF-8") from exc
        if self.first is None and line.strip("\r\n"):
            self.first = self.number
        return line

    def restart(self) -> None:
        self.first = None


def _csv(stream: IO[bytes], name: str, limit: int, delimiter: str) -> Iterator[tuple[Where, Any]]:
    csv.field_size_limit(limit)
    lines = _Lines(stream, limit)
    index = 0
    try:
        reader = csv.DictReader(lines, delimiter=delimiter)
        header = reader.fieldnames or []
    except _BadLine as bad:
        raise refuse(f"{name} line {bad.number} (the header) {bad.why}") from bad
    while True:
        lines.restart()
        try:
            row = next(reader)
        except StopIteration:
            return
        except _BadLine as bad:
            raise refuse(f"{name} line {bad.number} (record {index}) {bad.why}") from bad
        except csv.Error as exc:
            raise refuse(
                f"{name} line {lines.first or lines.number} (record {index}): {exc} (the limit is spec.dataset.maxRecordBytes)"
            ) from exc
        where = Where(
            name, index, lines.first or lines.number
        )  # a record spanning lines is placed at its first
        if None in row:
            raise refuse(
                f"{where} has {len(header) + len(row[None])} cells but the header has {len(header)}; quote cells that contain '{delimiter}'"
            )
        yield where, row  # missing cells are None, counted as invalid by the format
        index += 1


def _txt(stream: IO[bytes], name: str, limit: int) -> Iterator[tuple[Where, Any]]:
    """Documents separated by blank lines, each {"text": ...} placed at its first line."""
    index, start, size = 0, 0, 0
    parts: list[str] = []
    for line_no, raw in enumerate(iter(lambda: stream.readline(limit + 1), b""), start=1):
        if line_no == 1:
            raw = raw.removeprefix(BOM)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise refuse(
                f"{name} line {line_no} (record {index}) is not UTF-8 text; save the file as UTF-8"
            ) from exc
        if line.strip():
            if not parts:
                start = line_no
            parts.append(line)
            size += len(raw)
            if size > limit:
                raise refuse(
                    f"{name} line {start} (record {index}): a document larger than spec.dataset.maxRecordBytes ({limit} bytes); "
                    "separate documents with a blank line, or raise maxRecordBytes"
                )
            continue
        if parts:
            yield Where(name, index, start), {"text": "".join(parts).rstrip("\r\n")}
            index, parts, size = index + 1, [], 0
    if parts:
        yield Where(name, index, start), {"text": "".join(parts).rstrip("\r\n")}


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
