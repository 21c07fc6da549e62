"""`kubetune delete NAME`: delete the job; its ConfigMap, Service, Job and pods go with it."""

from __future__ import annotations

import argparse

from kubetune.cli.cluster_args import add_cluster_args, client_from, guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="FineTuneJob name(s)")
    add_cluster_args(parser)


@guarded
def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    for name in args.names:
        client.delete(name)
        print(f"finetunejob.kubetune.io/{name} deleted")
    return 0
