"""`kubetune run MANIFEST`: the FineTuneJob you would `kubectl apply`, trained here with torchrun.

    kubetune run examples/quickstart.yaml
    kubetune run job.yaml --nproc 2 --output runs/try1 --set training.maxSteps=20

The trainer config is rendered exactly as the operator renders it; the ranks are the
same `python -m kubetune_trainer` processes a pod runs, over gloo on CPU (NCCL on GPUs).
Relative paths in the manifest resolve against the manifest's directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.contract import COMPLETE_MARKER, ENV_CACHE_DIR, ENV_TERMINATION_LOG, METRICS_FILE, REASONS
from kubetune.api.models import FineTuneJob
from kubetune.render.trainer_config import render_trainer_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="FineTuneJob YAML (the one you would kubectl apply)")
    parser.add_argument("--output", help="artifacts directory or s3:// URI (overrides spec.output.uri)")
    parser.add_argument("--nproc", type=int, help="processes to start (default: nodes x procsPerNode)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. training.maxSteps=20")
    parser.add_argument("--verbose", action="store_true", help="show every line the ranks print")


# ------------------------------------------------------------------ pure parts


def load_manifest(path: Path) -> dict[str, Any]:
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
            return doc
    raise ValueError(f"{path}: no FineTuneJob document")


def set_path(spec: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--set {item!r}: expected key=value")
    parts = key.removeprefix("spec.").split(".")
    node = spec
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def resolve_uri(uri: str, base: Path) -> str:
    """Relative local paths (plain or file://) -> absolute file:// URIs; remote URIs unchanged."""
    if uri.startswith(("s3://", "hf://", "pvc://")):
        return uri
    path = uri.removeprefix("file://")
    return "file://" + str((base / path).resolve())


def localize(manifest: dict[str, Any], base: Path, output: str | None, nproc: int | None, overrides: list[str], gpus: int) -> FineTuneJob:
    """The manifest as this machine runs it: paths resolved, one node with `nproc` local processes."""
    spec = manifest.setdefault("spec", {})
    for item in overrides:
        set_path(spec, item)
    spec.setdefault("output", {})
    if output:
        spec["output"]["uri"] = output if output.startswith("s3://") else "file://" + str(Path(output).resolve())
    elif "uri" not in spec["output"]:
        spec["output"]["uri"] = "file://" + str(Path("runs", manifest.get("metadata", {}).get("name", "job")).resolve())
    spec["model"]["source"] = resolve_uri(spec["model"]["source"], base)
    spec["dataset"]["train"] = resolve_uri(spec["dataset"]["train"], base)
    if spec["dataset"].get("eval"):
        spec["dataset"]["eval"] = resolve_uri(spec["dataset"]["eval"], base)
    spec["output"]["uri"] = resolve_uri(spec["output"]["uri"], base)
    dist = spec.setdefault("distributed", {})
    procs = nproc or int(dist.get("nodes", 1)) * int(dist.get("procsPerNode", 1))
    if gpus:
        procs = min(procs, gpus)
    dist.update({"nodes": 1, "procsPerNode": procs, "gpusPerNode": procs if gpus else 0})
    return FineTuneJob.model_validate(manifest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress_line(p: dict[str, Any], width: int = 30) -> str:
    step, total = p.get("step") or 0, p.get("totalSteps") or 0
    done = int(width * step / total) if total else 0
    parts = [f"[{'#' * done}{'.' * (width - done)}] {step}/{total or '?'}"]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("evalLoss", "eval", "{:.4f}"), ("tokensPerSecond", "tok/s", "{:.0f}"), ("etaSeconds", "eta", "{:.0f}s")):
        if p.get(key) is not None:
            parts.append(f"{label} {fmt.format(p[key])}")
    parts.append(str(p.get("phase") or ""))
    return "  ".join(parts)


# ------------------------------------------------------------------ the shell


def _poll_progress(port: int, stop: threading.Event, tty: bool) -> None:
    last = ""
    while not stop.wait(0.5):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=1) as resp:
                line = progress_line(json.load(resp))
        except Exception:
            continue
        if line != last and tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        last = line


def run(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("kubetune run: the trainer is not installed; pip install 'kubetune[trainer]'", file=sys.stderr)
        return 64

    manifest_path = Path(args.manifest)
    try:
        job = localize(load_manifest(manifest_path), manifest_path.parent.resolve(), args.output, args.nproc, args.set, torch.cuda.device_count())
    except Exception as exc:
        print(f"kubetune run: {manifest_path}: {exc}", file=sys.stderr)
        return 64
    name = job.metadata.name or "job"
    port = free_port()
    config = render_trainer_config(job.spec, name=name, namespace=job.metadata.namespace or "default", uid=f"local-{name}", progress_port=port)
    work = Path(tempfile.mkdtemp(prefix=f"kubetune-{name}-"))
    config_path = work / "trainer-config.yaml"
    config_path.write_text(config.dump_yaml())
    log_path = work / "train.log"
    env = {**os.environ, ENV_TERMINATION_LOG: str(work / "termination-log")}
    env.setdefault(ENV_CACHE_DIR, str(Path.home() / ".cache" / "kubetune"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(config.world_size),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "kubetune_trainer", "--config", str(config_path),
    ]  # fmt: skip
    print(f"kubetune run: {name}: {config.world_size} process(es), {job.spec.method}, output {job.spec.output.uri}", file=sys.stderr)
    print(f"kubetune run: config {config_path}, log {log_path}", file=sys.stderr)
    done_marker = Path(job.spec.output.uri.removeprefix("file://")) / COMPLETE_MARKER
    if done_marker.exists():
        print(f"kubetune run: {done_marker.parent} already holds finished artifacts; nothing will be trained "
              "(delete it or pass --output to train again)", file=sys.stderr)  # fmt: skip
    tty = sys.stderr.isatty()
    stop = threading.Event()
    threading.Thread(target=_poll_progress, args=(port, stop, tty), daemon=True).start()
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    previous = signal.signal(signal.SIGINT, lambda *_: proc.send_signal(signal.SIGTERM))  # Ctrl-C: checkpoint, then stop
    with open(log_path, "w") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if args.verbose or line.startswith("[kubetune]") or "Error" in line or "error:" in line:
                sys.stderr.write(("\r\033[K" if tty else "") + line)
    code = proc.wait()
    stop.set()
    signal.signal(signal.SIGINT, previous)
    if tty:
        sys.stderr.write("\n")
    return report(code, work, job.spec.output.uri, time.time() - started, log_path)


def report(code: int, work: Path, uri: str, seconds: float, log_path: Path) -> int:
    termination = work / "termination-log"
    detail = json.loads(termination.read_text()) if termination.exists() else {}
    if code == 0:
        print(f"kubetune run: done in {seconds:.0f}s; artifacts in {uri}", file=sys.stderr)
        metrics_path = Path(uri.removeprefix("file://")) / METRICS_FILE
        if metrics_path.exists():
            m = json.loads(metrics_path.read_text())
            for key in ("evalLossBefore", "evalLossAfter", "exactMatchBefore", "exactMatchAfter", "tokensPerSecond"):
                if m.get(key) is not None:
                    print(f"  {key}: {m[key]:.4f}", file=sys.stderr)
        return 0
    code = int(detail.get("exitCode", code))
    reason = detail.get("reason") or REASONS.get(code, "Error")
    print(f"kubetune run: failed with exit code {code} ({reason}): {detail.get('message', 'see ' + str(log_path))}", file=sys.stderr)
    if not detail:
        print("".join(log_path.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
    return code
