"""`kubetune suspend|resume|delete NAME...`: one SDK call per named job.

- suspend: the pods checkpoint, then stop (resume continues from there);
- resume: a suspended job starts again from its last checkpoint;
- delete: the job goes, and its ConfigMap, Service, Job and pods with it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from kubetune.cli.cluster_args import add_cluster_args, client_from, guarded

# subcommand -> (the SDK call, what kubectl would print after the name)
ACTIONS: dict[str, tuple[Callable[[Any, str], object], str]] = {
    "suspend": (lambda client, name: client.suspend(name), "suspended"),
    "resume": (lambda client, name: client.resume(name), "resumed"),
    "delete": (lambda client, name: client.delete(name), "deleted"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="FineTuneJob name(s)")
    add_cluster_args(parser)


@guarded
def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    act, done = ACTIONS[args.command]
    for name in args.names:
        act(client, name)
        print(f"finetunejob.kubetune.io/{name} {done}")
    return 0
