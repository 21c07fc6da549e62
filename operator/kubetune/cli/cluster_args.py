"""What the cluster commands (submit, get, logs, describe, suspend, resume, delete, download) share:
kubectl's flags (-n, --context, --kubeconfig; KUBECONFIG), `-o yaml|json`, and one-line errors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from kubetune.api.models import FineTuneJob


def add_cluster_args(parser: argparse.ArgumentParser, output: bool = False) -> None:
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's, as kubectl)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    if output:
        parser.add_argument("-o", "--output", choices=["yaml", "json"], help="print the object(s) instead of a table")


def client_from(args: argparse.Namespace) -> Any:
    from kubetune.client import Client

    return Client(namespace=args.namespace, context=args.context, kubeconfig=args.kubeconfig)


def wire(job: FineTuneJob) -> dict[str, Any]:
    return job.model_dump(by_alias=True, exclude_none=True, mode="json")


def print_objects(jobs: list[FineTuneJob], fmt: str, single: bool) -> None:
    docs: Any = wire(jobs[0]) if single else {"apiVersion": "v1", "kind": "List", "items": [wire(j) for j in jobs]}
    print(json.dumps(docs, indent=2) if fmt == "json" else yaml.safe_dump(docs, sort_keys=False), end="" if fmt == "yaml" else "\n")


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; SDK errors become one line on stderr (SpecInvalid: one line per problem)."""

    def run(args: argparse.Namespace) -> int:
        from kubetune.client import ClientError, DownloadError, SpecInvalid

        try:
            return fn(args)
        except SpecInvalid as exc:
            print(f"kubetune {args.command}: spec invalid: {len(exc.problems)} problem(s)", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            return 64
        except (ClientError, DownloadError, TimeoutError) as exc:
            print(f"kubetune {args.command}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run
