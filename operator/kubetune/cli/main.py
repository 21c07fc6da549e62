"""`kubetune` command line: one entry point, one module per subcommand (imported lazily)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kubetune.cli.run", "run a FineTuneJob manifest locally with torchrun (no cluster needed)"),
    "crd": ("kubetune.cli.crd", "print the FineTuneJob CustomResourceDefinition generated from the API models"),
    "validate": ("kubetune.cli.validate", "check FineTuneJob manifests against the API without a cluster"),
    "render": ("kubetune.cli.render", "print the objects the operator would create for a manifest"),
    "operator": ("kubetune.cli.operator", "run the operator (Kopf) against the current cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Distributed fine-tuning on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("kubetune"):
                continue  # subcommand not built into this install
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
