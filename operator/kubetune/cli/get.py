"""`kubetune get [NAME] [-w] [-A] [-l SELECTOR] [-o yaml|json|wide|name]`: FineTuneJobs as a table (phase,
progress, loss, tokens/s, ETA), as kubectl prints them.

With -w the table stays on screen and changes as the jobs do (a Kubernetes watch, not polling);
with a NAME it returns once that job has succeeded or failed, without one it runs until Ctrl-C.
-A lists every namespace (a NAMESPACE column first); -o wide adds the method, the gang and the model.
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
    parser.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list the jobs of every namespace"
    )
    parser.add_argument("-l", "--selector", help="label selector, as kubectl's (e.g. team=nlp,tier!=dev)")
    parser.add_argument("--phase", help="only jobs in this phase")
    add_cluster_args(parser, output="a table")


def _console() -> Any:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    # Piped or redirected, as kubectl: whole columns, never cut to an 80-column guess.
    return console if console.is_terminal else Console(highlight=False, soft_wrap=False, width=1 << 12)


def _table(jobs: list[FineTuneJob], args: argparse.Namespace) -> Any:
    return render(jobs, wide=args.output == "wide", namespaces=args.all_namespaces)


@guarded
def run(args: argparse.Namespace) -> int:
    if args.name and args.all_namespaces:
        print("kubetune get: a NAME and -A exclude each other: name the namespace with -n", file=sys.stderr)
        return 2
    client = client_from(args)
    if not args.watch:
        if args.name:
            jobs = [client.get(args.name)]
        else:
            jobs = client.list(
                phase=args.phase, label_selector=args.selector, all_namespaces=args.all_namespaces
            )
        if args.output in ("yaml", "json", "name"):
            print_objects(jobs, args.output, single=bool(args.name))
        elif not jobs:
            where = "any namespace" if args.all_namespaces else f"namespace {client.namespace}"
            print(f"No FineTuneJobs in {where}.", file=sys.stderr)
        else:
            _console().print(_table(jobs, args))
        return 0
    return watch(client, args)


def watch(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from rich.live import Live

    jobs: dict[tuple[str, str], FineTuneJob] = {}
    console = _console()
    live = Live(_table([], args), console=console, refresh_per_second=4, auto_refresh=console.is_terminal,
                redirect_stdout=False, transient=False)  # fmt: skip
    with live:
        for event, job in client.watch(
            args.name, label_selector=args.selector, all_namespaces=args.all_namespaces
        ):
            key = (job.metadata.namespace or "", job.metadata.name or "")
            if event == "DELETED":
                jobs.pop(key, None)
            elif args.phase is None or (job.status and job.status.phase == args.phase):
                jobs[key] = job
            if args.output in ("yaml", "json", "name"):
                print_objects([job], args.output, single=True)
            else:
                live.update(_table(list(jobs.values()), args), refresh=True)
            if args.name and (event == "DELETED" or is_finished(job)):
                break
    return 0
