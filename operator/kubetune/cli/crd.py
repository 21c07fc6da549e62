"""`kubetune crd`: print the FineTuneJob CRD generated from the API models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune.api.crd import crd_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    parser.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE differs from the generated CRD (for CI)"
    )


def run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.check:
        if Path(args.check).read_text() != text:
            print(f"{args.check} is stale: run `kubetune crd -o {args.check}`", file=sys.stderr)
            return 1
        return 0
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
