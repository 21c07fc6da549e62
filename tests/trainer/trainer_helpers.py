"""Helpers for the trainer tests: small specs, configs rendered like the operator does, a torchrun launcher,
moto's S3 server on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "examples" / "data" / "tiny-llama"
SPELL = REPO / "examples" / "data" / "spell-digits"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def small_train_file(directory: Path, n: int = 256) -> Path:
    lines = SPELL.joinpath("train.jsonl").read_text().splitlines()[:n]
    out = directory / "train.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def job_spec(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A small FineTuneJob spec (camelCase) that trains the tiny model in seconds."""
    spec: dict[str, Any] = {
        "model": {"source": str(TINY_MODEL)},
        "dataset": {
            "train": str(small_train_file(tmp)),
            "eval": str(SPELL / "eval.jsonl"),
            "maxSeqLength": 32,
        },
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modulesToSave": ["lm_head"]},
        "training": {
            "maxSteps": 30,
            "learningRate": 0.005,
            "warmupSteps": 2,
            "perDeviceBatchSize": 8,
            "loggingSteps": 5,
            "seed": 1,
        },
        "distributed": {"nodes": 1, "procsPerNode": 2, "backend": "ddp"},
        "output": {"uri": str(tmp / "out"), "checkpointSteps": 10, "keepCheckpoints": 2},
    }
    for key, value in overrides.items():
        node = spec
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec


def write_config(tmp: Path, spec: dict[str, Any], name: str = "t") -> Path:
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.render.trainer_config import render_trainer_config

    config = render_trainer_config(
        FineTuneJobSpec.model_validate(spec), name=name, uid=f"uid-{tmp.name}", progress_port=free_port()
    )
    path = tmp / "trainer-config.yaml"
    path.write_text(config.dump_yaml())
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """http://127.0.0.1:PORT where nothing answers for as long as the block runs: the port is held bound but
    not listening, so every connect is refused (a port found free and let go can be taken meanwhile by
    another local server: CI once got a 401 from one instead of a refusal)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server (a real HTTP server) on a free loopback port, and its test credentials in the environment
    (restored after): yields the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=(port := free_port()))
    server.start()
    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(
    tmp: Path, config: Path, nproc: int, extra_env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen:
    port = free_port()
    env = {
        **os.environ,
        "KUBETUNE_DEBUG_DIR": str(tmp / "ranks"),
        "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "kubetune_trainer.launch", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "kubetune_trainer", "--config", str(config)]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def kill_run(proc: subprocess.Popen, tmp: Path) -> None:
    """SIGKILL a launched run: the launcher's process group (torchrun) and every process whose command line
    names `tmp` (the ranks: torchrun starts them in sessions of their own, so a killed torchrun's ranks
    lived on, parented to init, one hung at a debug step holding 1 GB until the machine stopped)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    needle = str(tmp).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), 9)
    proc.wait()


def run_trainer(
    tmp: Path, spec: dict[str, Any], nproc: int = 2, timeout: int = 300, env: dict[str, str] | None = None
) -> tuple[int, str]:
    spec["distributed"]["procsPerNode"] = nproc
    proc = launch(tmp, write_config(tmp, spec), nproc, env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc, tmp)  # the launcher, torchrun and the ranks: nothing outlives the test
        out, _ = proc.communicate()
        raise AssertionError(f"trainer did not finish in {timeout}s:\n{out[-4000:]}") from None
    return proc.returncode, out


def rank_dumps(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "ranks").glob("rank-*.json"))]


def termination(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "termination-log").read_text())
