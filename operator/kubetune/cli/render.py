"""`kubetune render FILE`: print the objects the operator would create for a manifest (with spec.serving,
also the InferenceService or Deployment it creates once the job succeeds, at the artifacts' expected URIs).

Every FineTuneJob in the file is checked first (exit 64 and every problem when any is refused).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from kubetune.api.validation import validate_manifest
from kubetune.cli.manifests import REFUSED, Refusal, print_problems, read_jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a YAML file with one or more FineTuneJobs ('-' reads stdin)")
    parser.add_argument("-n", "--namespace", default=None, help="namespace when the manifest has none (default: default)")
    parser.add_argument("--restart", type=int, default=0, help="gang generation to render (default 0)")
    parser.add_argument("--image", default=None, help="default trainer image when spec.image is unset")


def run(args: argparse.Namespace) -> int:
    from kubetune.api.names import DEFAULT_IMAGE
    from kubetune.render.objects import render_all
    from kubetune.render.serving import render_serving
    from kubetune.status.derive import artifacts

    try:
        docs = read_jobs(args.file)
    except Refusal as exc:
        print(exc, file=sys.stderr)
        return REFUSED
    if args.restart < 0:
        print(f"--restart {args.restart}: must be >= 0", file=sys.stderr)
        return REFUSED
    jobs = []
    for doc in docs:
        job, problems = validate_manifest(doc)
        if job is None:
            print_problems(args.file, doc, problems)
            continue
        jobs.append((doc, job))
    if len(jobs) < len(docs):
        return REFUSED
    out = []
    for doc, job in jobs:
        meta = job.metadata
        namespace = meta.namespace or args.namespace or "default"
        labels = doc["metadata"].get("labels") or {}
        out += render_all(job.spec, meta.name or "", namespace, meta.uid or "", args.restart, labels, args.image or DEFAULT_IMAGE)
        if job.spec.serving is not None:
            expected = artifacts(job.spec).model_dump(by_alias=True, exclude_none=True)
            out.append(render_serving(job.spec, meta.name or "", namespace, expected))
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0
