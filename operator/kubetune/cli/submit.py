"""`kubetune submit FILE [--wait] [-o yaml|json|wide|name]`: create a FineTuneJob from a manifest (validated
first, as `kubetune validate`); prints `finetunejob.kubetune.io/NAME created` as kubectl does, or the object."""

from __future__ import annotations

import argparse
import sys

from kubetune.api.models import Progress
from kubetune.cli.cluster_args import RESOURCE, add_cluster_args, client_from, guarded, print_objects
from kubetune.cli.run import progress_fields
from kubetune.client.jobs import checked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="FineTuneJob YAML")
    parser.add_argument(
        "--wait", action="store_true", help="follow its progress; exit 0 when it succeeds, 1 when it fails"
    )
    parser.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    add_cluster_args(parser, output="NAME created")


@guarded
def run(args: argparse.Namespace) -> int:
    checked(args.file)  # every problem, before looking for a cluster
    client = client_from(args)
    job = client.submit(args.file)
    name = job.metadata.name
    if args.output in ("yaml", "json", "name"):
        print_objects([job], args.output, single=True)
    elif args.output == "wide":
        from kubetune.cli.get import _console
        from kubetune.cli.table import render

        _console().print(render([job], wide=True))
    else:
        print(f"{RESOURCE}/{name} created")
    if not args.wait:
        return 0

    def show(p: Progress) -> None:
        eta = f"  eta {p.eta}" if p.eta else ""
        print(f"{name}: step {p.step}/{p.total_steps}  {progress_fields(p.to_wire())}{eta}", file=sys.stderr)

    done = client.wait(
        name,
        timeout=args.timeout,
        on_progress=show,
        on_phase=lambda phase: print(f"{name}: {phase}", file=sys.stderr),
    )
    arts = done.status.artifacts if done.status else None
    if arts:
        print(f"{name}: artifacts: {arts.merged_model or arts.adapter}", file=sys.stderr)
    return 0
