"""Reading FineTuneJob manifests for `validate`, `render` and `run`: one path, one way to report.

Nothing here imports torch or the trainer: a manifest is refused in well under a second.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import ExitCode
from kubetune.api.manifest_yaml import ManifestError, load_documents, read_text
from kubetune.api.models import KIND
from kubetune.api.validation import Problem

# Exit code of every command that refuses its input (the trainer's ConfigInvalid: a retry cannot help).
REFUSED = int(ExitCode.CONFIG_INVALID)


@dataclass(frozen=True)
class Refusal(Exception):
    """The file cannot be used; `message` is one line."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def read_jobs(file: str) -> list[dict[str, Any]]:
    """The FineTuneJob documents in `file` ('-': stdin), in order; Refusal when there are none or the file is bad."""
    try:
        docs = load_documents(read_text(file, sys.stdin.buffer if file == "-" else None))
    except ManifestError as exc:
        raise Refusal(file, str(exc)) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        kinds = sorted({str(d.get("kind")) for d in docs if isinstance(d, dict) and d.get("kind")})
        found = f" (found {', '.join(kinds)})" if kinds else ""
        raise Refusal(file, f"no document with kind: {KIND}{found}")
    return jobs


def job_name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name[:60] if isinstance(name, str) and name else "(unnamed)"


def print_problems(file: str, doc: dict[str, Any], problems: list[Problem]) -> None:
    """`FILE: FineTuneJob NAME: N problem(s)` and then one indented line per problem: field, what, fix."""
    print(f"{file}: {KIND} {job_name(doc)}: {len(problems)} problem(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
