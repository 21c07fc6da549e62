"""`kubetune report NAME`: the job's model card (README.md in its artifacts: base model, data, method,
hyper-parameters, results, evaluation tables), shown in the terminal; `--output-dir DIR` keeps it with its plots
(loss.png, eval.png), `--open` opens it in the browser or viewer."""

from __future__ import annotations

import argparse
import tempfile
import webbrowser
from pathlib import Path

from kubetune.api.contract import CARD_FILE
from kubetune.cli.cluster_args import add_cluster_args, add_s3_endpoint_arg, client_from, guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument("--output-dir", metavar="DIR", help="save README.md, loss.png and eval.png here")
    parser.add_argument(
        "--open", action="store_true", help="open the card (README.md) in the browser or viewer"
    )
    parser.add_argument("--raw", action="store_true", help="print the Markdown as it is, not rendered")
    add_s3_endpoint_arg(parser)
    add_cluster_args(parser)


def show(markdown: str, raw: bool) -> None:
    if raw:
        print(markdown, end="")
        return
    from rich.console import Console
    from rich.markdown import Markdown

    if markdown.startswith("---\n"):  # the Hub's YAML front matter: metadata, not for reading
        markdown = markdown.split("\n---\n", 1)[-1].lstrip("\n")
    Console().print(Markdown(markdown))


@guarded
def run(args: argparse.Namespace) -> int:
    keep = args.output_dir or (
        tempfile.mkdtemp(prefix=f"kubetune-report-{args.name}-") if args.open else None
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-report-") as scratch:
        dest = Path(keep or scratch)
        got = client_from(args).report(args.name, dest, endpoint=args.s3_endpoint)
        show((dest / CARD_FILE).read_text(), args.raw)
        if keep:
            print(
                f"\nsaved {', '.join(p.name for p in got.files)} to {dest} ({got.verified} checked against the manifest)"
            )
        if args.open:
            webbrowser.open((dest / CARD_FILE).resolve().as_uri())
    return 0
