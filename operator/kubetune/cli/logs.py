"""`kubetune logs NAME [--rank N] [-f]`: the trainer's log of one node rank of the current gang."""

from __future__ import annotations

import argparse

from kubetune.cli.cluster_args import add_cluster_args, client_from, guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument(
        "--rank", type=int, default=0, help="node rank (the pod's completion index; default 0)"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing as the trainer writes")
    parser.add_argument("--tail", type=int, help="only the last N lines")
    add_cluster_args(parser)


@guarded
def run(args: argparse.Namespace) -> int:
    for line in client_from(args).logs(args.name, rank=args.rank, follow=args.follow, tail=args.tail):
        print(line, flush=True)
    return 0
