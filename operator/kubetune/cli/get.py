"""`kubetune get [NAME] [-w] [-o yaml|json]`: FineTuneJobs as a table (phase, progress, loss, tokens/s, ETA).

With -w the table stays on screen and changes as the jobs do (a Kubernetes watch, not polling);
with a NAME it returns once that job has succeeded or failed, without one it runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kubetune.api.models import FineTuneJob
from kubetune.cli.cluster_args import add_cluster_args, client_from, guarded, print_objects
from kubetune.cli.table import render
from kubetune.client.jobs import is_finished


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="one FineTuneJob (default: all in the namespace)")
    parser.add_argument("-w", "--watch", action="store_true", help="keep the table live as the jobs change")
    parser.add_argument("--phase", help="only jobs in this phase")
    add_cluster_args(parser, output=True)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


@guarded
def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    if not args.watch:
        jobs = [client.get(args.name)] if args.name else client.list(phase=args.phase)
        if args.output:
            print_objects(jobs, args.output, single=bool(args.name))
        elif not jobs:
            print(f"No FineTuneJobs in namespace {client.namespace}.", file=sys.stderr)
        else:
            _console().print(render(jobs))
        return 0
    return watch(client, args)


def watch(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from rich.live import Live

    jobs: dict[str, FineTuneJob] = {}
    console = _console()
    live = Live(render([]), console=console, refresh_per_second=4, auto_refresh=console.is_terminal,
                redirect_stdout=False, transient=False)  # fmt: skip
    with live:
        for event, job in client.watch(args.name):
            name = job.metadata.name or ""
            if event == "DELETED":
                jobs.pop(name, None)
            elif args.phase is None or (job.status and job.status.phase == args.phase):
                jobs[name] = job
            if args.output:
                print_objects([job], args.output, single=True)
            else:
                live.update(render(list(jobs.values())), refresh=True)
            if args.name and (event == "DELETED" or is_finished(job)):
                break
    return 0
