"""`kubetune run MANIFEST`: the FineTuneJob you would `kubectl apply`, trained here with torchrun.

    kubetune run examples/quickstart.yaml
    kubetune run job.yaml --nproc 2 --output runs/try1 --set training.maxSteps=20

The trainer config is rendered exactly as the operator renders it; the ranks are the
same `python -m kubetune_trainer` processes a pod runs, over gloo on CPU (NCCL on GPUs).
Relative paths in the manifest resolve against the manifest's directory.

Before anything heavy starts (torch is imported only by the ranks) the manifest goes through
the same validation as `kubetune validate`, and the output is checked: writable, enough free
space, not overlapping an input. Ctrl-C (SIGINT), SIGTERM and SIGHUP checkpoint at the next
step boundary on every rank and exit 130 / 143 / 129; running the command again resumes.
A second Ctrl-C stops every rank at once; the last complete checkpoint is kept.

An output belongs to the job that first wrote it (.kubetune-owner.json): another job's output is
refused, and one another run of the same job is training in (its lock is held) too. `--dry-run`
checks all this and writes nothing. `--resume-from OUTPUT` starts a new run from OUTPUT's newest
checkpoint with this manifest's config (the local twin of `spec.output.resumeFrom: previous`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    ENV_CACHE_DIR,
    ENV_TERMINATION_LOG,
    METRICS_FILE,
    OUTPUT_LOCK,
    OWNER_FILE,
    REASONS,
    RUN_CONFIG_FILE,
    RUN_LOG_FILE,
    RUN_TERMINATION_FILE,
    USER_ERRORS,
    ExitCode,
)
from kubetune.api.manifest_yaml import ManifestError, load_documents
from kubetune.api.models import FineTuneJob
from kubetune.api.uris import map_uris, resolve_uri, spec_uris
from kubetune.api.validation import Problem, SpecInvalid, validate_manifest
from kubetune.cli.manifests import REFUSED, Refusal, print_problems, read_jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="FineTuneJob YAML (the one you would kubectl apply)")
    parser.add_argument("--output", help="artifacts directory or s3:// URI (overrides spec.output.uri)")
    parser.add_argument("--nproc", type=int, help="processes to start (default: nodes x procsPerNode)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. training.maxSteps=20",
    )
    parser.add_argument("--verbose", action="store_true", help="show every line the ranks and torchrun print")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the manifest and the output, print the command, start nothing, write nothing",
    )
    parser.add_argument(
        "--resume-from",
        metavar="OUTPUT",
        help="start a new run from OUTPUT's newest checkpoint with this config (spec.output.resumeFrom: previous)",
    )
    parser.add_argument("--work-dir", help="where the trainer config, the log and the termination message go "
                        "(default: a new temporary directory)")  # fmt: skip


# ------------------------------------------------------------------ pure parts


def load_manifest(path: Path) -> dict[str, Any]:
    """The first FineTuneJob in the file (bounded YAML); ValueError when there is none or the file is bad."""
    try:
        return read_jobs(str(path))[0]
    except Refusal as exc:
        raise ValueError(str(exc)) from None


def set_path(spec: dict[str, Any], item: str) -> None:
    """`a.b=value` sets spec.a.b; the value is read as YAML (as in the manifest)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. training.maxSteps=20")
    parts = key.removeprefix("spec.").split(".")
    node = spec
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {item!r}: spec.{part} is not a mapping")
        node = child
    try:
        docs = load_documents(raw)
    except ManifestError as exc:
        raise ValueError(f"--set {item!r}: {exc}") from None
    node[parts[-1]] = docs[0] if docs else None


def localized_document(
    manifest: dict[str, Any],
    base: Path,
    output: str | None,
    nproc: int | None,
    overrides: list[str],
    gpus: int,
) -> tuple[dict[str, Any], list[Problem]]:
    """The manifest as this machine runs it: paths resolved, one node with `nproc` local processes.

    Never raises on a malformed manifest: fields it cannot localize are left for validation to report."""
    problems: list[Problem] = []
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return manifest, problems
    for item in overrides:
        try:
            set_path(spec, item)
        except ValueError as exc:
            problems.append(Problem("--set", str(exc)))
    out = spec.setdefault("output", {})
    if isinstance(out, dict):
        meta = manifest.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if output:
            out["uri"] = output if output.startswith("s3://") else "file://" + str(Path(output).resolve())
        elif "uri" not in out:
            out["uri"] = "file://" + str(
                Path("runs", name if isinstance(name, str) and name else "job").resolve()
            )
    map_uris(spec, lambda uri: resolve_uri(uri, base))
    dist = spec.setdefault("distributed", {})
    if isinstance(dist, dict):
        nodes, per_node = dist.get("nodes", 1), dist.get("procsPerNode", 1)
        as_written = [dist.get(k, 0) for k in ("nodes", "procsPerNode", "gpusPerNode")]
        if nproc is not None and nproc < 1:
            problems.append(Problem("--nproc", f"must be >= 1 (got {nproc})"))
        elif all(
            isinstance(v, int) and not isinstance(v, bool) for v in as_written
        ):  # else validation says why
            procs = nproc or nodes * per_node
            if gpus:
                procs = min(procs, gpus)
            dist.update({"nodes": 1, "procsPerNode": procs, "gpusPerNode": procs if gpus else 0})
    return manifest, problems


def localize(
    manifest: dict[str, Any],
    base: Path,
    output: str | None,
    nproc: int | None,
    overrides: list[str],
    gpus: int,
) -> FineTuneJob:
    """The localized, validated job; SpecInvalid with every problem otherwise."""
    doc, problems = localized_document(manifest, base, output, nproc, overrides, gpus)
    job, more = validate_manifest(doc)
    if job is None or problems or more:
        raise SpecInvalid(problems + more)
    return job


def local_gpus() -> int:
    """GPUs this machine offers, without importing torch (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    return sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("file://")) if uri.startswith("file://") else None


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )


def output_bytes_needed(job: FineTuneJob, model_bytes: int) -> int:
    """A rough floor for one checkpoint plus the final artifacts: full fine-tuning saves weights and two
    AdamW moments (about 3x the weights) then the model; LoRA saves an adapter and, merged, the model."""
    spec = job.spec
    if spec.method == "full":
        return 4 * model_bytes
    return (model_bytes if spec.output.merge_adapter else 0) + 16 * 1024 * 1024


@dataclass(frozen=True)
class Failure:
    """A refusal found before training: exit code and one line."""

    code: int
    message: str


def preflight(job: FineTuneJob, dry_run: bool = False, uid: str | None = None) -> Failure | None:
    """Cheap checks that save a user the torch start-up: inputs exist, the output is writable, has room, is apart
    from every input (symlinks resolved) and is not another job's or in use. A dry run creates nothing."""
    spec = job.spec
    model = local_path(spec.model.source)
    if model is not None and not model.exists():
        return Failure(
            ExitCode.MODEL_NOT_FOUND,
            f"spec.model.source: {model} does not exist; point it at a model directory",
        )
    inputs = [(f, uri) for f, uri in spec_uris(spec).items() if f != "spec.output.uri"]
    for field, uri in inputs:
        if field == "spec.model.source":
            continue
        path = local_path(uri)
        if path is not None and not path.exists():
            return Failure(ExitCode.DATASET_INVALID, f"{field}: {path} does not exist")
    out = local_path(spec.output.uri)
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        return Failure(REFUSED, f"spec.output.uri: {out} is a file; the output must be a directory")
    if overlap := overlapping_input(out, inputs):
        return Failure(REFUSED, overlap)
    if (taken := output_taken(out, uid)) is not None:
        return Failure(REFUSED, taken)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if dry_run:
        if not os.access(existing, os.W_OK | os.X_OK):
            return Failure(
                REFUSED,
                f"spec.output.uri: cannot write to {existing}; choose a writable directory (--output)",
            )
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".kubetune-write-check-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            return Failure(
                REFUSED,
                f"spec.output.uri: cannot write to {out}: {exc.strerror or exc}; choose a writable directory (--output)",
            )
    if (out / COMPLETE_MARKER).exists():
        return None
    need = output_bytes_needed(job, _dir_bytes(model) if model is not None and model.exists() else 0)
    free = shutil.disk_usage(existing).free
    if free < need:
        return Failure(
            REFUSED,
            f"spec.output.uri: {out} has {free / 2**20:,.0f} MiB free; a checkpoint and the final model need about "
            f"{need / 2**20:,.0f} MiB; free some space or choose another --output",
        )
    return None


def overlapping_input(out: Path, inputs: list[tuple[str, str]]) -> str | None:
    """The output and each local input compared as the filesystem resolves them (symlinks followed): validation
    compares the URIs as written, and a link would let the job write COMPLETE into its own base model."""
    real_out = Path(os.path.realpath(out))
    for field, uri in inputs:
        path = local_path(uri) if uri else None
        if path is None or not path.exists():
            continue
        real = Path(os.path.realpath(path))
        if real_out == real or real_out.is_relative_to(real) or real.is_relative_to(real_out):
            return (f"spec.output.uri: {out} resolves to {real_out}, which overlaps {field} ({real}): the job writes its "
                    "checkpoints, model/ and COMPLETE there; choose an output directory apart from every input")  # fmt: skip
    return None


def output_taken(out: Path, uid: str | None) -> str | None:
    """Why this job may not write to `out`: it belongs to another job, or a run holds its lock; None when free."""
    owner_file = out / OWNER_FILE
    if uid is not None and owner_file.is_file():
        try:
            owner = json.loads(owner_file.read_text())
        except ValueError:
            owner = {}
        if isinstance(owner, dict) and owner.get("uid") != uid:
            return (f"spec.output.uri: {out} belongs to job {owner.get('namespace', '?')}/{owner.get('job', '?')} "
                    f"(uid {owner.get('uid', '?')}); choose another --output, or delete {out} to reuse it")  # fmt: skip
    if (out / OUTPUT_LOCK).exists():
        from filelock import FileLock, Timeout

        lock = FileLock(str(out / OUTPUT_LOCK))
        try:
            lock.acquire(timeout=0)
            lock.release()
        except Timeout:
            return f"spec.output.uri: {out} is in use by another run (its lock is held); wait for it to finish or choose another --output"
    return None


def newest_checkpoint(uri: str) -> str | None:
    """The newest complete checkpoint under a local output, as a path; None when there is none."""
    out = local_path(uri)
    if out is None:
        return None
    done = sorted(p for p in (out / CHECKPOINTS_DIR).glob("*") if (p / COMPLETE_MARKER).exists())
    return str(done[-1]) if done else None


ROOT_CAUSE = re.compile(
    r"host\s*:\s*(?P<host>\S+)\s+rank\s*:\s*(?P<rank>\d+)[^\n]*\n\s*exitcode\s*:\s*(?P<code>-?\d+)",
    re.MULTILINE,
)


def failure_line(code: int, detail: dict[str, Any], log_text: str, log_path: Path) -> tuple[int, str]:
    """One line for a failed run: which rank, on which node, exit code, reason class, message, log path."""
    start = log_text.rfind("Root Cause")  # torchrun lists the other failures first
    root = ROOT_CAUSE.search(log_text[start:] if start >= 0 else log_text)
    rank = f"rank {root['rank']} on {root['host']}" if root else "a rank"
    raw = int(root["code"]) if root else code
    code = int(detail.get("exitCode", code))
    reason = str(detail.get("reason") or REASONS.get(code, "Error"))
    message = str(detail.get("message") or "no message; see the log")
    if raw < 0 and code not in USER_ERRORS:  # killed by a signal: the peers' gloo errors are noise
        name = signal.Signals(-raw).name if -raw in signal.valid_signals() else f"signal {-raw}"
        code, reason = int(ExitCode.INFRASTRUCTURE), "Killed"
        message = f"killed by {name}" + (" (out of memory? see `dmesg`)" if raw == -9 else "")
    return code, f"kubetune run: failed: {rank}: exit code {code} ({reason}): {message}; log {log_path}"


def progress_fields(p: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("evalLoss", "eval", "{:.4f}"),
        ("tokensPerSecond", "tok/s", "{:.0f}"),
    ):
        if isinstance(p.get(key), int | float):
            parts.append(f"{label} {fmt.format(p[key])}")
    if p.get("phase"):
        parts.append(str(p["phase"]))
    return "  ".join(parts)


# ------------------------------------------------------------------ the shell


class Display:
    """A rich progress bar on a terminal (log lines scroll above it); plain lines otherwise."""

    def __init__(self, tty: bool):
        self.bar: Any = None
        if tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("train", total=None, info="starting")
            self.bar.start()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def progress(self, p: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=p.get("step") or 0,
                total=p.get("totalSteps") or None,
                info=progress_fields(p),
            )

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _poll_progress(port: int, stop: threading.Event, display: Display) -> None:
    import urllib.request

    while not stop.wait(0.5):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=1) as resp:
                display.progress(json.load(resp))
        except Exception:
            continue


class Interrupts:
    """First SIGINT/SIGTERM/SIGHUP: ask the ranks to checkpoint and stop. Second: stop them at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, proc: subprocess.Popen[str], display: Display):
        self.proc, self.display = proc, display
        self.first: int | None = None
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.first is None:
            self.first = signum
            self.display.line(
                f"kubetune run: {signal.Signals(signum).name}: checkpointing at the next step, then stopping "
                "(Ctrl-C again stops at once, keeping the last complete checkpoint)"
            )
            _signal_tree(
                self.proc.pid, signal.SIGTERM, include_children=False
            )  # torchrun passes it to every rank
        else:
            _signal_tree(self.proc.pid, signal.SIGKILL, include_children=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _signal_tree(pid: int, sig: int, include_children: bool) -> None:
    """Signal torchrun (and, for SIGKILL, every rank: torchrun starts each in its own session)."""
    pids = [pid]
    if include_children:
        try:
            import psutil

            pids = [c.pid for c in psutil.Process(pid).children(recursive=True)] + [pid]
        except Exception:
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def run(args: argparse.Namespace) -> int:
    manifest_path = Path(args.manifest)
    try:
        doc = read_jobs(args.manifest)[0]
    except Refusal as exc:
        print(f"kubetune run: {exc}", file=sys.stderr)
        return REFUSED
    gpus = local_gpus()
    localized, problems = localized_document(
        doc, manifest_path.parent.resolve(), args.output, args.nproc, args.set, gpus
    )
    job, more = validate_manifest(localized)
    if job is None or problems or more:
        print_problems(args.manifest, doc, problems + more)
        dist = (
            localized.get("spec", {}).get("distributed") if isinstance(localized.get("spec"), dict) else None
        )
        if isinstance(dist, dict) and dist.get("procsPerNode") is not None:
            print(
                f"  (run locally as nodes: 1, procsPerNode: {dist['procsPerNode']}; --nproc changes it)",
                file=sys.stderr,
            )
        return REFUSED
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("kubetune_trainer") is None:
        print("kubetune run: the trainer is not installed; pip install 'kubetune[trainer]'", file=sys.stderr)
        return REFUSED
    failure = preflight(job, args.dry_run, local_uid(job))
    if failure is not None:
        print(
            f"kubetune run: {args.manifest}: {REASONS.get(failure.code, 'Error')}: {failure.message}",
            file=sys.stderr,
        )
        return int(failure.code)
    return launch(job, args)


def local_uid(job: FineTuneJob) -> str:
    """The owner a local run records: runs of one job name resume each other; another name is another owner."""
    return f"local-{job.metadata.name or 'job'}"


def launch(job: FineTuneJob, args: argparse.Namespace) -> int:
    from kubetune.render.trainer_config import render_trainer_config

    name = job.metadata.name or "job"
    port = free_port()
    config = render_trainer_config(
        job.spec,
        name=name,
        namespace=job.metadata.namespace or "default",
        uid=local_uid(job),
        progress_port=port,
    )
    if args.resume_from:
        config = config.model_copy(update={"resume_from": resolve_uri(args.resume_from, Path.cwd())})
    run_id = uuid.uuid4().hex[:12]
    if args.dry_run:
        print(
            f"kubetune run: {name}: {config.world_size} process(es), {job.spec.method}, output {job.spec.output.uri} (dry run: nothing written)",
            file=sys.stderr,
        )
        print(" ".join(trainer_command(config.world_size, "<config>")))
        return 0
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="kubetune-run-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / RUN_TERMINATION_FILE).unlink(missing_ok=True)  # an earlier run's message is not this one's
    config_path = work / RUN_CONFIG_FILE
    config_path.write_text(config.dump_yaml())
    log_path = work / RUN_LOG_FILE
    env = {**os.environ, ENV_TERMINATION_LOG: str(work / RUN_TERMINATION_FILE), "KUBETUNE_RUN_ID": run_id}
    env.setdefault(ENV_CACHE_DIR, str(Path.home() / ".cache" / "kubetune"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = trainer_command(config.world_size, str(config_path))
    uri = job.spec.output.uri
    print(
        f"kubetune run: {name}: {config.world_size} process(es), {job.spec.method}, output {uri}, run {run_id}",
        file=sys.stderr,
    )
    print(f"kubetune run: config {config_path}, log {log_path}", file=sys.stderr)
    out = local_path(uri)
    if out is not None and (out / COMPLETE_MARKER).exists():
        print(f"kubetune run: {out} already holds finished artifacts; nothing will be trained "
              "(delete it or pass --output to train again)", file=sys.stderr)  # fmt: skip
    display = Display(sys.stderr.isatty())
    stop = threading.Event()
    threading.Thread(target=_poll_progress, args=(port, stop, display), daemon=True).start()
    started = time.time()
    # Its own session: a terminal's Ctrl-C reaches kubetune alone, which turns it into one orderly stop.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    interrupts = Interrupts(proc, display)
    try:
        with open(log_path, "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if args.verbose or (
                    line.startswith("[kubetune]") and not line.startswith("[kubetune] error:")
                ):
                    display.line(line.rstrip("\n"))
        code = proc.wait()
    finally:
        stop.set()
        display.stop()
        interrupts.restore()
    return report(code, work, uri, time.time() - started, log_path, interrupts.first, args)


def trainer_command(world_size: int, config_path: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world_size),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "kubetune_trainer", "--config", config_path,
    ]  # fmt: skip


def report(
    code: int,
    work: Path,
    uri: str,
    seconds: float,
    log_path: Path,
    signum: int | None,
    args: argparse.Namespace,
) -> int:
    termination = work / RUN_TERMINATION_FILE
    try:
        detail = json.loads(termination.read_text()) if termination.exists() else {}
    except ValueError:
        detail = {}
    finished = int(detail.get("exitCode", -1)) == 0 and (
        local_path(uri) is None or (Path(uri.removeprefix("file://")) / COMPLETE_MARKER).exists()
    )
    if code == 0 or (
        signum is not None and finished
    ):  # a stop that came after rank 0 sealed the output: it finished
        print(f"kubetune run: done in {seconds:.0f}s; artifacts in {uri}", file=sys.stderr)
        metrics_path = Path(uri.removeprefix("file://")) / METRICS_FILE
        if metrics_path.exists():
            m = json.loads(metrics_path.read_text())
            for key in (
                "evalLossBefore",
                "evalLossAfter",
                "exactMatchBefore",
                "exactMatchAfter",
                "tokensPerSecond",
            ):
                if m.get(key) is not None:
                    print(f"  {key}: {m[key]:.4f}", file=sys.stderr)
        return 0
    if signum is not None and int(detail.get("exitCode", 0)) not in USER_ERRORS:
        where = newest_checkpoint(uri) or (
            f"{uri}/{CHECKPOINTS_DIR}/" if not uri.startswith("file://") else None
        )
        kept = (
            f"checkpoint in {where}"
            if where
            else "no checkpoint was written yet (stopped before the first step)"
        )
        again = (
            " ".join(["kubetune", "run", *sys.argv[2:]])
            if sys.argv[1:2] == ["run"]
            else f"kubetune run {args.manifest}"
        )
        print(
            f"kubetune run: stopped by {signal.Signals(signum).name}; {kept}; resume with: {again}",
            file=sys.stderr,
        )
        return 128 + signum
    code, line = failure_line(code, detail, log_path.read_text(errors="replace"), log_path)
    print(line, file=sys.stderr)
    return code
