"""`kubetune validate FILE...`: check FineTuneJob manifests against the API without a cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kubetune.api.models import KIND
from kubetune.api.validation import validate_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML manifests ('-' reads stdin)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")


def run(args: argparse.Namespace) -> int:
    failed = 0
    for file in args.files:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            print(f"{file}: cannot read: {exc}", file=sys.stderr)
            failed += 1
            continue
        jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
        if not jobs:
            print(f"{file}: no {KIND} in this file", file=sys.stderr)
            failed += 1
        for doc in jobs:
            name = (doc.get("metadata") or {}).get("name", "?")
            _, problems = validate_manifest(doc)
            if problems:
                failed += 1
                print(f"{file}: {KIND} {name}: {len(problems)} problem(s)", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
            elif not args.quiet:
                print(f"{file}: {KIND} {name}: valid")
    return 1 if failed else 0
