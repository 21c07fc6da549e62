"""Entry point: `torchrun ... -m kubetune_trainer --config trainer-config.yaml [--set training.maxSteps=5]`."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from kubetune.api.contract import CONFIG_PATH, ENV_CONFIG_PATH, ExitCode, TrainerPhase, is_retryable
from kubetune.api.trainer_config import TrainerConfig

if TYPE_CHECKING:
    from kubetune_trainer.train import Trainer


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` sets spec.a.b.c (YAML-typed value); a leading `spec.` or top-level key is also accepted."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        path = key.split(".")
        node = document
        if path[0] == "spec" or path[0] not in document:
            path = path[1:] if path[0] == "spec" else path
            node = document["spec"]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw)
    return document


def unclassified(exc: BaseException) -> int:
    """Anything not classified: assume infrastructure, a restart may help."""
    from kubetune_trainer.errors import write_termination_message

    traceback.print_exc()
    write_termination_message(ExitCode.INFRASTRUCTURE, f"{type(exc).__name__}: {exc}")
    return int(ExitCode.INFRASTRUCTURE)


def load_config(path: str, overrides: list[str]) -> TrainerConfig:
    from pydantic import ValidationError

    from kubetune_trainer.errors import TrainerError

    try:
        with open(path) as handle:
            document = apply_overrides(yaml.safe_load(handle), overrides)
        return TrainerConfig.model_validate(document)
    except (OSError, ValueError, ValidationError, yaml.YAMLError) as exc:
        raise TrainerError(ExitCode.CONFIG_INVALID, f"config {path}: {exc}") from exc


def run(trainer: Trainer) -> ExitCode:
    """setup -> train -> save; the termination message says how it ended."""
    from kubetune_trainer.errors import write_termination_message

    trainer.setup()
    code = ExitCode.OK
    if not trainer.done:
        code = trainer.train()
        if code == ExitCode.OK:
            trainer.save()
    if code != ExitCode.OK and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        # With the progress: its lastCheckpoint is the step a restart resumes from (status.lastCheckpoint). One
        # process per pod: the ranks of a pod share the file, and two truncating writers of different lengths
        # could leave it unreadable (the launcher then reported 75 instead of 143).
        write_termination_message(
            code,
            f"stopped by {trainer.stop_reason()} after writing the checkpoint at step {trainer.state.step}",
            trainer.progress.report(),
        )
    elif int(os.environ.get("RANK", "0")) == 0:
        # Rank 0 alone: on a node running several ranks the message is one file, and it carries the
        # final progress the operator shows once the job has succeeded.
        report = trainer.progress.report()
        finished = "training finished" + (
            f"; {report.checkpoint_warning}" if report.checkpoint_warning else ""
        )
        write_termination_message(code, finished, report, trainer.published(), trainer.facts.evaluation)
    return code


def failed(caught: Exception, trainer: Trainer | None) -> int:
    """A classified error (or an OSError the user can fix): one line, the termination message, its exit code."""
    from kubetune_trainer.errors import TrainerError, user_os_error, write_termination_message

    error = (
        caught
        if isinstance(caught, TrainerError)
        else user_os_error(caught)
        if isinstance(caught, OSError)
        else None
    )
    if error is None:
        return unclassified(caught)
    print(f"[kubetune] error: {error.message}", file=sys.stderr, flush=True)
    if trainer is not None:
        trainer.progress.update(phase=TrainerPhase.FAILED)
        if not is_retryable(error.exit_code):  # no gang will continue: the tracker's run ends FAILED
            trainer.end_tracking(int(error.exit_code))
    write_termination_message(error.exit_code, error.message, evaluation=getattr(error, "result", None))
    return int(error.exit_code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", default=os.environ.get(ENV_CONFIG_PATH, CONFIG_PATH))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. training.maxSteps=5",
    )
    return parser.parse_args(argv)


def start_up() -> None:
    """Before the heavy imports: a signal during imports or start-up ends the rank cleanly (nothing to checkpoint
    yet), and DeepSpeed on a node without CUDA is told to use the CPU before anything imports it."""
    from kubetune_trainer.signals import stop_at_once

    stop_at_once()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_up()
    from kubetune_trainer.errors import TrainerError, write_termination_message
    from kubetune_trainer.signals import StoppedBeforeTraining

    trainer = None
    try:
        config = load_config(args.config, args.set)
        from kubetune_trainer.train import Trainer

        trainer = Trainer(config)
        return int(run(trainer))
    except StoppedBeforeTraining as exc:
        print(f"[kubetune] {exc}", file=sys.stderr, flush=True)
        write_termination_message(ExitCode.PREEMPTED, str(exc))
        return int(ExitCode.PREEMPTED)
    except (TrainerError, OSError) as caught:
        return failed(caught, trainer)
    except Exception as exc:
        return unclassified(exc)
    finally:
        if trainer is not None:
            try:
                trainer.cleanup()
            except Exception:
                pass


def leave(code: int) -> NoReturn:
    """Exit with `code`. A rank stopped for a restart (143: SIGTERM, a peer's stop, a stop before training) skips
    the interpreter's finalization: its checkpoint, termination message and tracker flush are done by then (the
    uploads are waited for), and collecting torch's and transformers' objects on the way out took 8-12 s per rank
    on a busy node, inside torchrun's 30 s window and the pod's grace period, delaying the restart as long."""
    if code != ExitCode.PREEMPTED:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
