"""`kubetune validate FILE...`: check FineTuneJob manifests against the API without a cluster.

Exit 0 when every FineTuneJob is valid, 64 (ConfigInvalid) when any file or job is refused.
"""

from __future__ import annotations

import argparse
import sys

from kubetune.api.validation import validate_manifest
from kubetune.cli.manifests import REFUSED, Refusal, job_name, print_problems, read_jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML manifests ('-' reads stdin)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")


def run(args: argparse.Namespace) -> int:
    failed = False
    for file in args.files:
        try:
            jobs = read_jobs(file)
        except Refusal as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        for doc in jobs:
            _, problems = validate_manifest(doc)
            if problems:
                failed = True
                print_problems(file, doc, problems)
            elif not args.quiet:
                print(f"{file}: FineTuneJob {job_name(doc)}: valid")
    return REFUSED if failed else 0
