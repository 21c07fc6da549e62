"""`kubetune preflight MANIFEST`: what the model will learn, and whether it fits, before any GPU starts.

    kubetune preflight examples/quickstart.yaml
    kubetune preflight job.yaml --json            # for CI pipelines
    kubetune preflight job.yaml --gpu-memory 24   # size against a 24 GiB GPU

It reads the data and the tokenizer exactly as the trainer does (formats, `fields`,
overflow, invalid records) and prints: the detected format and column mapping of each
dataset; three examples with the learned tokens highlighted; the token-length
distribution against maxSeqLength; tokens and steps per epoch; and an estimate of peak
memory per GPU from the model's config.json. A data error exits 66 with the trainer's
message. Relative paths in the manifest resolve against the manifest's directory.

Learned tokens are green on a terminal and between [[ and ]] where there is no colour (a pipe,
a file, NO_COLOR). The libraries' own warnings (deprecations, optional kernels) are not the
user's to act on and stay silent unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune.api.contract import REASONS, ExitCode

GIB = 1 << 30
# Around the learned tokens when the output has no colour.
LEARNED_OPEN, LEARNED_CLOSE = "[[", "]]"
# Libraries whose warnings preflight keeps quiet (logger names).
QUIET_LOGGERS = ("bitsandbytes", "transformers", "accelerate", "peft", "torch", "datasets")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="FineTuneJob YAML (the one you would kubectl apply)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--examples", type=int, default=3, help="rendered examples to show (default 3)")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        metavar="GIB",
        help="memory per GPU to size against (default 80)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. dataset.maxSeqLength=512",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own warnings")


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Library warnings off (Python warnings and the libraries' loggers below ERROR), restored after."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _job(path: Path, overrides: list[str]) -> Any:
    """The manifest with its paths resolved, through the one validation (SpecInvalid lists every problem)."""
    from kubetune.api.uris import map_uris, resolve_uri
    from kubetune.api.validation import SpecInvalid, validate_manifest
    from kubetune.cli.run import load_manifest, set_path

    manifest = load_manifest(path)
    spec = manifest.setdefault("spec", {})
    for item in overrides:
        set_path(spec, item)
    base = path.parent
    spec.setdefault("output", {}).setdefault("uri", "file:///tmp/kubetune-preflight")  # not written to
    map_uris(spec, lambda uri: resolve_uri(uri, base))
    job, problems = validate_manifest(manifest)
    if job is None:
        raise SpecInvalid(problems)
    return job


def run(args: argparse.Namespace) -> int:
    from kubetune.api.validation import SpecInvalid

    try:
        job = _job(Path(args.manifest), args.set)
    except SpecInvalid as exc:
        print(
            f"{REASONS[ExitCode.CONFIG_INVALID]}: {args.manifest}: {len(exc.problems)} problem(s)",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return int(ExitCode.CONFIG_INVALID)
    except ValueError as exc:
        print(f"{REASONS[ExitCode.CONFIG_INVALID]}: {args.manifest}: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG_INVALID)

    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.preflight import run_preflight

    try:
        with quiet_libraries(not args.verbose):
            summary = run_preflight(job.spec, args.examples, int(args.gpu_memory * GIB))
    except TrainerError as exc:
        print(f"{REASONS.get(exc.exit_code, 'Error')}: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        show(summary)
    memory = summary["memory"]
    return 0 if memory is None or memory["fits"] is not False else 1


def example_text(example: list[dict[str, Any]], marked: bool, style: str = "bold green") -> Any:
    """One rendered example: learned tokens in `style`, context dim; `marked` also wraps each run of
    learned tokens in [[ ]], for output without colour."""
    from rich.text import Text

    text = Text()
    for i, token in enumerate(example):
        learned = token["learned"]
        if marked and learned and (i == 0 or not example[i - 1]["learned"]):
            text.append(LEARNED_OPEN)
        text.append(token["text"], style=style if learned else "dim")
        if marked and learned and (i + 1 == len(example) or not example[i + 1]["learned"]):
            text.append(LEARNED_CLOSE)
    return text


def show(summary: dict[str, Any]) -> None:
    """The summary for people: tables, learned tokens in green (or marked), the memory verdict last."""
    from kubetune_trainer.preflight import text_lines
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(title="Datasets", title_justify="left")
    for col in ("path", "format and mapping", "records", "examples", "weight", "invalid skipped"):
        table.add_column(col)
    for s in summary["sources"]:
        invalid = ", ".join(f"{n} {r}" for r, n in s["invalid"].items()) or "0"
        path = s["path"].removeprefix("file://")
        table.add_row(
            path if len(path) <= 40 else "..." + path[-37:],
            s["mapping"],
            str(s["records"]),
            str(s["examples"]),
            f"{s['weight']:g}",
            invalid,
        )
    console.print(table)
    marked = console.color_system is None  # not a terminal, or NO_COLOR
    for i, example in enumerate(summary["examples"], start=1):
        console.print(Text(f"example {i}: ", style="bold") + example_text(example, marked))
    for i, pair in enumerate(summary.get("pairs") or [], start=1):
        console.print(
            Text(
                f"pair {i} ({pair['promptTokens']} prompt tokens, chosen {pair['chosenTokens']}, rejected {pair['rejectedTokens']}):",
                style="bold",
            )
        )
        console.print(Text("  prompt:   ", style="bold").append(pair["prompt"], style="dim"))
        for name, style in (("chosen", "bold green"), ("rejected", "bold red")):
            console.print(
                Text(f"  {name}: ".ljust(12), style="bold") + example_text(pair[name], marked, style)
            )
    where = f"between {LEARNED_OPEN} {LEARNED_CLOSE}" if marked else "in green"
    if summary.get("pairs"):
        where = (
            f"between {LEARNED_OPEN} {LEARNED_CLOSE}" if marked else "in green (chosen) and red (rejected)"
        )
        console.print(Text(f"scored reply tokens {where}; the prompt is context", style="italic"))
    else:
        console.print(Text(f"learned tokens {where}; the rest is context the loss ignores", style="italic"))
    ln = summary["lengths"]
    hist = Table(title=f"Tokens per example (maxSeqLength {ln['maxSeqLength']})", title_justify="left")
    hist.add_column("tokens")
    hist.add_column("examples", justify="right")
    hist.add_column("")
    top = max((b["count"] for b in ln["histogram"]), default=1) or 1
    lower = 0
    for b in ln["histogram"]:
        label = f"{lower + 1}-{b['upTo']}" if b["upTo"] is not None else f"> {ln['maxSeqLength']}"
        hist.add_row(
            label,
            str(b["count"]),
            "#" * round(30 * b["count"] / top),
            style="red" if b["upTo"] is None and b["count"] else None,
        )
        lower = b["upTo"] or lower
    console.print(hist)
    for line in text_lines(summary)[len(summary["sources"]) :]:
        console.print(line, style="bold red" if "WARNING" in line else None)
