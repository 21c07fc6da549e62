"""A checkpoint asked of rank 0 (POST /checkpoint, what the operator sends before an eviction or a suspend):
every rank writes it at the same step boundary, training goes on, and a later SIGTERM writes a newer one."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.contract import CHECKPOINT_PATH, ExitCode
from kubetune_trainer.progress import ProgressState, serve
from trainer_helpers import job_spec, launch, termination, write_config


def post(port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{CHECKPOINT_PATH}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback)
        assert resp.status == 202
        return dict(json.loads(resp.read()))


def progress(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5) as resp:  # noqa: S310 (loopback)
        return dict(json.loads(resp.read()))


def test_a_request_is_counted_once_until_served() -> None:
    state = ProgressState()
    server = serve(state, 0, host="127.0.0.1")
    port = server.server_address[1]
    try:
        assert post(port) == {"requested": 1, "step": 0}
        assert post(port)["requested"] == 1  # asked again before it was served: still the one checkpoint
        assert state.checkpoint_asked() == 1 and progress(port)["checkpointRequests"] is None
        state.checkpoint_served(1)
        assert progress(port)["checkpointRequests"] == 1
        assert post(port)["requested"] == 2  # a new request after that one was served
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/nothing", method="POST", data=b"")
            )
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_requested_checkpoint_is_written_by_every_rank_at_one_step(tmp_path: Path) -> None:
    spec = job_spec(
        tmp_path, **{"training.maxSteps": 2000, "output.checkpointSteps": 10000, "dataset.eval": None}
    )
    config = write_config(tmp_path, spec)
    port = yaml.safe_load(config.read_text())["progressPort"]
    proc = launch(tmp_path, config, nproc=2, start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while not any("step 10/2000" in line for line in lines):  # training is under way
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        asked = post(port)
        while ((seen := progress(port))["checkpointRequests"] or 0) < asked["requested"]:
            assert time.time() < deadline, "".join(lines)[-4000:]
            time.sleep(0.1)
        written = seen["lastCheckpoint"]
        step = written["step"]
        assert step >= asked["step"] >= 10
        directory = tmp_path / "out" / "checkpoints" / f"step-{step:08d}"
        assert written["uri"].rstrip("/").endswith(directory.name) and (directory / "COMPLETE").exists()
        files = json.loads((directory / "manifest.json").read_text())["files"]
        rng = sorted(n for n in files if "random_states" in n)
        assert rng == ["accelerate/random_states_0.pkl", "accelerate/random_states_1.pkl"], (
            files
        )  # both ranks, this step
        while progress(port).get("step", 0) <= step:  # the request did not stop training
            assert time.time() < deadline, "".join(lines)[-4000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # the pods go: the SIGTERM path writes the newer step, once
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0, out[-4000:]
    message = termination(tmp_path)
    assert message["exitCode"] == ExitCode.PREEMPTED
    last = message["progress"]["lastCheckpoint"]
    assert (
        last["step"] > step
        and (tmp_path / "out" / "checkpoints" / f"step-{last['step']:08d}" / "COMPLETE").exists()
    )
    written_steps = [int(s) for s in re.findall(r"checkpoint step (\d+) ->", out)]
    assert written_steps == [step, last["step"]], out[-4000:]  # each once, nothing else
