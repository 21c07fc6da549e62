"""`kubetune crd [-o yaml|json] [--output-file FILE] [--check FILE]`: the FineTuneJob CRD generated from the
API models (printed, written to a file, or compared with one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune.api.crd import crd_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=["yaml", "json"],
        default="yaml",
        metavar="FORMAT",
        help="output format: yaml|json (default: yaml, as checked in under crds/)",
    )
    parser.add_argument("--output-file", metavar="FILE", help="write to this file instead of stdout")
    parser.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE differs from the generated CRD (for CI)"
    )


def run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.check:
        if Path(args.check).read_text() != text:
            print(f"{args.check} is stale: run `kubetune crd --output-file {args.check}`", file=sys.stderr)
            return 1
        return 0
    if args.output == "json":
        import json

        import yaml

        text = json.dumps(yaml.safe_load(text), indent=2) + "\n"
    if args.output_file:
        Path(args.output_file).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
