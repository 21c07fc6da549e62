"""`kubetune render FILE`: print the objects the operator would create for a manifest (with spec.serving,
also the InferenceService or Deployment it creates once the job succeeds, at the artifacts' expected URIs).

Every FineTuneJob in the file is checked first (exit 64 and every problem when any is refused).
-o yaml (the default: a multi-document stream for `kubectl apply -f -`), json (a v1 List), name
(kind.group/name per object) or wide (a table: kind, name, namespace, image).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from kubetune.api.validation import validate_manifest
from kubetune.cli.cluster_args import add_output_arg, kind_name, print_docs
from kubetune.cli.manifests import REFUSED, Refusal, print_problems, read_jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a YAML file with one or more FineTuneJobs ('-' reads stdin)")
    parser.add_argument(
        "-n", "--namespace", default=None, help="namespace when the manifest has none (default: default)"
    )
    parser.add_argument("--image", default=None, help="default trainer image when spec.image is unset")
    add_output_arg(parser, "yaml")


def image_of(doc: dict[str, Any]) -> str:
    """The first container's image of a rendered pod template (the Job, a serving Deployment), else ""."""
    spec = doc.get("spec") or {}
    pod = ((spec.get("template") or {}).get("spec")) or {}
    containers = pod.get("containers") or []
    return str(containers[0].get("image", "")) if containers else ""


def wide_table(docs: list[dict[str, Any]]) -> str:
    rows = [("KIND", "NAME", "NAMESPACE", "IMAGE")]
    rows += [(d["kind"], kind_name(d), d["metadata"].get("namespace", ""), image_of(d)) for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "   " + r[3] for r in rows
    )


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
        out += render_all(
            job.spec,
            meta.name or "",
            namespace,
            meta.uid or "",
            labels,
            args.image or DEFAULT_IMAGE,
        )
        if job.spec.serving is not None:
            expected = artifacts(job.spec).model_dump(by_alias=True, exclude_none=True)
            out.append(render_serving(job.spec, meta.name or "", namespace, expected))
    if args.output in ("json", "name"):
        print_docs(out, args.output, single=False)
    elif args.output == "wide":
        print(wide_table(out))
    else:
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0
