# PYTHON_ARGCOMPLETE_OK
"""`kubetune` command line: one entry point, one module per subcommand (imported lazily)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kubetune.cli.run", "run a FineTuneJob manifest locally with torchrun (no cluster needed)"),
    "preflight": (
        "kubetune.cli.preflight",
        "show what the model will learn from the data, and whether it fits, before training",
    ),
    "crd": (
        "kubetune.cli.crd",
        "print the FineTuneJob CustomResourceDefinition generated from the API models",
    ),
    "validate": ("kubetune.cli.validate", "check FineTuneJob manifests against the API without a cluster"),
    "render": ("kubetune.cli.render", "print the objects the operator would create for a manifest"),
    "operator": ("kubetune.cli.operator", "run the operator (Kopf) against the current cluster"),
    # On a cluster, through the SDK (kubetune.client); kubectl's -n/--context/KUBECONFIG and -o yaml|json|wide|name.
    "submit": ("kubetune.cli.submit", "create a FineTuneJob from a manifest (--wait to follow it)"),
    "get": ("kubetune.cli.get", "list FineTuneJobs with phase, progress, loss, tokens/s and ETA (-w: live)"),
    "describe": (
        "kubetune.cli.describe",
        "show a FineTuneJob's conditions, last failure, artifacts and events",
    ),
    "logs": ("kubetune.cli.logs", "print a rank's trainer log (-f to follow)"),
    "suspend": ("kubetune.cli.lifecycle", "suspend FineTuneJobs (pods checkpoint, then stop)"),
    "resume": ("kubetune.cli.lifecycle", "resume suspended FineTuneJobs from their last checkpoint"),
    "delete": ("kubetune.cli.lifecycle", "delete FineTuneJobs and everything they own"),
    "download": ("kubetune.cli.download", "download a job's merged model or adapter to a directory"),
    "report": (
        "kubetune.cli.report",
        "show a job's model card (metrics, evaluation, plots); --output-dir DIR saves it",
    ),
    "version": (
        "kubetune.cli.version",
        "print the client's version and the cluster's operator and CRD versions",
    ),
    "completion": ("kubetune.cli.completion", "print a shell completion script (bash, zsh or fish)"),
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


# Exit code when kubetune itself fails (sysexits EX_SOFTWARE): a bug, never a verdict on the input.
INTERNAL_ERROR = 70


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (kubetune completion)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"kubetune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kubetune render ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # user input is refused with a message before this; anything here is a bug
        if os.environ.get("KUBETUNE_TRACEBACK"):
            raise
        print(
            f"kubetune {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(a bug in kubetune; KUBETUNE_TRACEBACK=1 shows where, please report it)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
