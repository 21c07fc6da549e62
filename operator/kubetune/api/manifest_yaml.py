"""Reading manifests as the API server would, with bounds a hostile file cannot get past.

- at most MAX_DOCUMENT_BYTES are read (the API server's request limit is about 3 MiB, etcd's 1.5 MiB);
- aliases may expand to at most MAX_EXPANDED_NODES nodes, nested at most MAX_DEPTH deep
  (a 1 KB alias bomb would otherwise grow to gigabytes once serialised);
- a key given twice in one mapping is an error (kubectl refuses it too), not a silent overwrite;
- plain scalars resolve as Kubernetes' YAML does: `1e-4` is a number, `2024-01-01` a string.

Every refusal is a `ManifestError` with one line that says where (line and column) and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DOCUMENT_BYTES = 3 * 1024 * 1024
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64


class ManifestError(ValueError):
    """A file that cannot be read as YAML manifests; the message is one line for a person."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with duplicate keys refused, YAML 1.2 floats, and timestamps left as strings."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise ConstructorError(
                    None,
                    None,
                    f"key {key_node.value!r} is given twice in this mapping (first on line {seen[key].line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# Kubernetes' YAML (go-yaml) reads 1e-4 and 1E+3 as numbers; PyYAML's YAML 1.1 resolver needs a dot.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$"),
    list("-+.0123456789"),
)


def _check_size(node: Node) -> None:
    """Walk the node graph with aliases expanded, within a budget (aliases share nodes, so this counts copies)."""
    count = 0
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > MAX_EXPANDED_NODES:
            raise ManifestError(
                f"line {current.start_mark.line + 1}: the document expands to more than {MAX_EXPANDED_NODES:,} values "
                "(YAML aliases repeated too often?); write it out without anchors and aliases"
            )
        if depth > MAX_DEPTH:
            raise ManifestError(
                f"line {current.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; a FineTuneJob never needs this"
            )
        if isinstance(current, MappingNode):
            for key, value in current.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(current, SequenceNode):
            stack.extend((item, depth + 1) for item in current.value)


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _yaml_message(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context and "twice" not in problem else problem
    if "'\\t'" in text:
        text += " (indent with spaces, not tabs)"
    return f"{_where(exc)}{text}"


def load_documents(text: str) -> list[Any]:
    """Every document in `text` (None for empty ones), or ManifestError naming the first thing wrong."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ManifestError(
            f"is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB; a FineTuneJob is a few KB"
        )
    docs: list[Any] = []
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_size(node)
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise ManifestError(f"document {len(docs) + 1} is not valid YAML: {_yaml_message(exc)}") from None
    except RecursionError:
        raise ManifestError(f"document {len(docs) + 1} is nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def read_text(path: str, stdin: BinaryIO | None = None) -> str:
    """The file's text ('-' reads `stdin`), at most MAX_DOCUMENT_BYTES, as UTF-8; ManifestError otherwise."""
    try:
        if path == "-":
            assert stdin is not None
            data = stdin.read(MAX_DOCUMENT_BYTES + 1)
        else:
            p = Path(path)
            if p.is_dir():
                raise ManifestError("is a directory; give the path of a YAML file")
            with p.open("rb") as f:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError("no such file") from None
    except OSError as exc:
        raise ManifestError(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ManifestError(
            f"is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB; a FineTuneJob is a few KB"
        )
    if b"\x00" in data:
        raise ManifestError("is a binary file, not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
