"""What the cluster commands (submit, get, logs, describe, suspend, resume, delete, download) share:
kubectl's flags (-n, --context, --kubeconfig; KUBECONFIG), `-o yaml|json|wide|name`, and one-line errors
(exit 1 when the API server cannot be reached or refuses the credentials, as kubectl)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from kubetune.api.models import FineTuneJob

# kubectl's output formats: the object(s) as YAML or JSON, the table with more columns, or kind/name only.
OUTPUTS = ("yaml", "json", "wide", "name")
RESOURCE = "finetunejob.kubetune.io"


def add_output_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        metavar="FORMAT",
        help=f"output format: {'|'.join(OUTPUTS)} (default: {default})",
    )


def add_cluster_args(parser: argparse.ArgumentParser, output: str | None = None) -> None:
    """kubectl's connection flags; `output` (the default format's description) adds -o."""
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's, as kubectl)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    if output:
        add_output_arg(parser, output)


def add_s3_endpoint_arg(parser: argparse.ArgumentParser) -> None:
    """--s3-endpoint, for the commands that read a job's artifacts from this machine (download, report)."""
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint as this machine reaches it, when the job's spec.storage.endpoint is an "
        "in-cluster address (default: the job's)",
    )


def client_from(args: argparse.Namespace) -> Any:
    from kubetune.client import Client

    return Client(namespace=args.namespace, context=args.context, kubeconfig=args.kubeconfig)


def wire(job: FineTuneJob) -> dict[str, Any]:
    return job.model_dump(by_alias=True, exclude_none=True, mode="json")


def print_docs(docs: list[dict[str, Any]], fmt: str, single: bool) -> None:
    """Objects as kubectl prints them: one object, or a v1 List; `name` prints kind.group/name per line."""
    if fmt == "name":
        for d in docs:
            print(kind_name(d))
        return
    out: Any = docs[0] if single else {"apiVersion": "v1", "kind": "List", "items": docs}
    print(
        json.dumps(out, indent=2) if fmt == "json" else yaml.safe_dump(out, sort_keys=False),
        end="" if fmt == "yaml" else "\n",
    )


def kind_name(doc: dict[str, Any]) -> str:
    """`kind.group/name` as `kubectl -o name` prints it (core objects without a group)."""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    kind = str(doc.get("kind", "")).lower()
    return f"{kind}.{group}/{doc['metadata']['name']}" if group else f"{kind}/{doc['metadata']['name']}"


def print_objects(jobs: list[FineTuneJob], fmt: str, single: bool) -> None:
    print_docs([wire(j) for j in jobs], fmt, single)


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; SDK errors become one line on stderr (SpecInvalid: one line per problem)."""

    def run(args: argparse.Namespace) -> int:
        from urllib3.exceptions import HTTPError

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
        except HTTPError as exc:  # a connection lost outside the SDK's calls (a log stream, a watch's chunk)
            print(f"kubetune {args.command}: connection to the API server lost: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run
