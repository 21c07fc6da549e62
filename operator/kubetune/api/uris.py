"""Every URI a FineTuneJob spec names, listed once: validation checks them (storage credentials, overlap with
the output), the operator mounts the PVCs they name, and `kubetune run` and the local SDK make their local
paths absolute. The same walk reads a typed spec and a manifest's raw `spec` (each field on the way has one
name in both: model, source, dataset, train, sources, path, eval, evaluation, retain, output, uri).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

URI_FIELDS: Final = (
    ("model", "source"),
    ("dataset", "train"),
    ("dataset", "sources", "*", "path"),
    ("dataset", "eval"),
    ("evaluation", "retain", "train"),
    ("evaluation", "retain", "sources", "*", "path"),
    (
        "evaluation",
        "retain",
        "eval",
    ),  # refused by validation (the whole retain set is scored), but a URI field
    ("output", "uri"),
)
"""Where a spec names a URI; `*` is each item of a list. The output comes last: it is written, the rest read."""
REMOTE_SCHEMES: Final = ("s3://", "hf://", "pvc://")


def _get(node: Any, key: str) -> Any:
    return node.get(key) if isinstance(node, Mapping) else getattr(node, key, None)


def _slots(node: Any, path: tuple[str, ...], field: str) -> Iterator[tuple[str, Any, str]]:
    """(field name, the object holding it, its key) for each place `path` reaches under `node`."""
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                yield from _slots(item, rest, f"{field}[{i}]")
        return
    if not rest:
        yield f"{field}.{head}", node, head
    elif (child := _get(node, head)) is not None:
        yield from _slots(child, rest, f"{field}.{head}")


def uri_slots(spec: Any) -> Iterator[tuple[str, Any, str]]:
    for path in URI_FIELDS:
        yield from _slots(spec, path, "spec")


def spec_uris(spec: Any) -> dict[str, str]:
    """{field: URI} for every URI the spec (a FineTuneJobSpec or a manifest's `spec` mapping) names, in
    URI_FIELDS order, e.g. {"spec.model.source": "s3://models/tiny", "spec.dataset.sources[1].path": ...}."""
    out: dict[str, str] = {}
    for field, holder, key in uri_slots(spec):
        value = _get(holder, key)
        if isinstance(value, str) and value:
            out[field] = value
    return out


def map_uris(spec: dict[str, Any], fn: Callable[[str], str]) -> None:
    """Replace, in a manifest's raw `spec`, each URI `spec_uris()` lists by `fn(uri)`. Fields of the wrong type
    are left for validation to report."""
    for _, holder, key in uri_slots(spec):
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            holder[key] = fn(holder[key])


def resolve_uri(uri: str, base: Path) -> str:
    """A local path (relative to `base`, or absolute) as an absolute file:// URI; other schemes as they are."""
    if uri.startswith(REMOTE_SCHEMES):
        return uri
    return "file://" + os.path.normpath(base / uri.removeprefix("file://"))
