"""`kubetune render FILE`: print the objects the operator would create for a manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kubetune.api.models import KIND
from kubetune.api.validation import validate_manifest
from kubetune.render.objects import DEFAULT_IMAGE, render_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a YAML file with one or more FineTuneJobs ('-' reads stdin)")
    parser.add_argument("-n", "--namespace", default=None, help="namespace when the manifest has none (default: default)")
    parser.add_argument("--restart", type=int, default=0, help="gang generation to render (default 0)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="default trainer image when spec.image is unset")


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    out = []
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        job, problems = validate_manifest(doc)
        if job is None or problems:
            for problem in problems:
                print(f"{args.file}: {problem}", file=sys.stderr)
            return 1
        meta = job.metadata
        namespace = meta.namespace or args.namespace or "default"
        labels = (doc.get("metadata") or {}).get("labels") or {}
        out += render_all(job.spec, meta.name or "", namespace, meta.uid or "", args.restart, labels, args.image)
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0
