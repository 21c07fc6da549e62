"""`kubetune download NAME DIR`: copy the job's merged model (or adapter) from its storage, checked against
its manifest. Credentials: the job's storage Secret when you may read it, else your AWS_* environment."""

from __future__ import annotations

import argparse

from kubetune.cli.cluster_args import add_cluster_args, add_s3_endpoint_arg, client_from, guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument("dir", help="local directory to write into (DIR/model/..., DIR/adapter/...)")
    parser.add_argument(
        "--what",
        choices=["auto", "model", "adapter", "all"],
        default="auto",
        help="auto: the merged model if there is one, else the adapter (default)",
    )
    add_s3_endpoint_arg(parser)
    add_cluster_args(parser)


@guarded
def run(args: argparse.Namespace) -> int:
    got = client_from(args).download(args.name, args.dir, which=args.what, endpoint=args.s3_endpoint)
    print(f"{got.uri} -> {got.path} ({len(got.files)} files, {got.verified} checked against the manifest)")
    return 0
