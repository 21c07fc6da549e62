"""The network check before step 0: rank 0's rendezvous port probed before torchrun (kubetune_trainer.reach),
then a timed ring of point-to-point messages and an all-reduce over gloo (kubetune_trainer.netcheck).

The slow tests run real torchrun, two "pods" (one torchrun each, --nnodes 2) on this machine; the blocked one
puts the second pod in a private network namespace (`unshare -n`: no route to anything), so nothing of the
host's network is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.api.contract import ExitCode
from kubetune_trainer import reach
from trainer_helpers import free_port, kill_run


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def dropping() -> Iterator[int]:
    """A port whose SYNs are dropped, as a NetworkPolicy drops them: a listener with a full accept queue
    (Linux drops a SYN it has no room for instead of refusing it)."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # takes the one place in the queue; nobody accepts it
        yield port


def test_target_is_read_from_torchruns_own_arguments() -> None:
    args = [
        "--nnodes",
        "2",
        "--node-rank=1",
        "--master-addr",
        "j-r0-0.j",
        "--master_port",
        "29511",
        "-m",
        "x",
    ]
    assert reach.target_of(args) == reach.Target("j-r0-0.j", 29511, "1")
    assert reach.target_of(["--standalone", "-m", "x"]) is None


def test_a_listening_port_answers_a_closed_one_is_waited_for(listening: int) -> None:
    assert reach.attempt(reach.Target("127.0.0.1", listening, "1")) is None
    closed = free_port()
    answer = reach.attempt(reach.Target("127.0.0.1", closed, "1"))
    assert answer is not None and answer.startswith("waiting:") and "refused" in answer
    answer = reach.attempt(reach.Target("no-such-pod.invalid", closed, "1"))
    assert answer is not None and answer.startswith("waiting:") and "does not resolve" in answer


def test_dropped_packets_are_blocked(dropping: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reach, "CONNECT_SECONDS", 0.3)
    answer = reach.attempt(reach.Target("127.0.0.1", dropping, "1"))
    assert answer is not None and answer.startswith("blocked:") and "timed out" in answer
    start = time.monotonic()
    why = reach.probe(reach.Target("127.0.0.1", dropping, "1"), timeout=1.0, wait=60)
    assert why is not None and "timed out" in why and time.monotonic() - start < 3


def test_a_block_must_last_the_timeout_in_a_row_and_a_starting_rank_zero_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reach, "PAUSE_SECONDS", 0.01)
    target = reach.Target("x", 1, "1")
    answers = iter(["blocked: a", "waiting: b", "blocked: c", "blocked: d", None])
    assert reach.probe(target, timeout=0.0, wait=60, connect=lambda _: next(answers)) == "a"
    answers = iter(["blocked: a", "waiting: b", "blocked: c", None])
    assert reach.probe(target, timeout=30, wait=60, connect=lambda _: next(answers)) is None  # reached
    # rank 0 never listens: after `wait`, torchrun takes over (and waits as it always did)
    assert reach.probe(target, timeout=0.0, wait=0.05, connect=lambda _: "waiting: refused") is None


WORKER = Path(__file__).with_name("network_worker.py")


def _pod(
    tmp: Path, node: int, port: int, timeout: int = 10, prefix: tuple[str, ...] = ()
) -> subprocess.Popen:
    """One "pod" as the operator renders it: the probe, then torchrun for node `node` of 2, running the
    network check alone (the trainer runs the same `netcheck.check` before loading the model)."""
    env = {
        **os.environ,
        "KUBETUNE_POD_NAME": f"nc-r0-{node}-pod",
        "KUBETUNE_TERMINATION_LOG": str(tmp / f"termination-{node}"),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", str(WORKER), "check", str(tmp / "network.json")]  # fmt: skip
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "kubetune_trainer.reach",
        "--timeout-seconds",
        str(timeout),
        "--",
        *torchrun,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float, tmp: Path) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc, tmp)
        out, _ = proc.communicate()
        raise AssertionError(f"did not finish in {timeout}s:\n{out[-4000:]}") from None
    return proc.returncode, out


@pytest.mark.slow
def test_two_pods_reach_rank_zero_then_time_the_ring_and_the_all_reduce(tmp_path: Path) -> None:
    port = free_port()
    second = _pod(tmp_path, 1, port)  # first: its probe waits for rank 0's torchrun to listen
    time.sleep(1)
    first = _pod(tmp_path, 0, port)
    code0, out0 = _finish(first, 120, tmp_path)
    code1, out1 = _finish(second, 30, tmp_path)
    assert code0 == code1 == 0, out0[-3000:] + out1[-3000:]
    assert "network check over gloo, 2 ranks" in out0, out0[-3000:]
    network = json.loads((tmp_path / "network.json").read_text())
    assert network["backend"] == "gloo" and network["worldSize"] == 2 and network["megabytes"] == 4
    pods = [(p["source"], p["sourcePod"], p["target"], p["targetPod"]) for p in network["pairs"]]
    assert pods == [(1, "nc-r0-1-pod", 0, "nc-r0-0-pod"), (0, "nc-r0-0-pod", 1, "nc-r0-1-pod")]
    assert all(p["latencyMs"] > 0 and p["bandwidthGbps"] > 0 for p in network["pairs"]), network
    assert network["allReduceMs"] > 0 and network["allReduceBusGbps"] > 0 and network["seconds"] < 5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -n (root)")
def test_a_pod_that_cannot_reach_rank_zero_fails_with_network_unreachable_in_seconds(tmp_path: Path) -> None:
    port = free_port()
    first = _pod(tmp_path, 0, port)  # rank 0's torchrun listens on the host's loopback
    try:
        start = time.monotonic()
        blocked = _pod(tmp_path, 1, port, timeout=5, prefix=("unshare", "-n"))  # no route to it
        code, out = _finish(blocked, 60, tmp_path)
        elapsed = time.monotonic() - start
    finally:
        kill_run(first, tmp_path)  # its torchrun's rank waits for a peer that never comes
        first.communicate()
    assert code == ExitCode.NETWORK_UNREACHABLE, out[-3000:]
    assert elapsed < 15, elapsed  # the 5 s bound, not torchrun's 15-minute join timeout
    message = json.loads((tmp_path / "termination-1").read_text())
    assert message["reason"] == "NetworkUnreachable" and message["exitCode"] == 72
    for needle in ("pod nc-r0-1-pod (node rank 1)", "rank 0 at 127.0.0.1", f"port {port}", "unreachable"):
        assert needle in message["message"], message["message"]


@pytest.mark.slow
def test_a_peer_that_never_answers_over_the_backend_ends_the_rank_at_the_deadline(tmp_path: Path) -> None:
    """NCCL connects at the first message, so a blocked backend port hangs there, not at the rendezvous."""
    env = {
        **os.environ,
        "KUBETUNE_POD_NAME": "nc-r0-0-pod",
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           "silent-peer", str(tmp_path / "network.json")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    code, out = _finish(proc, 120, tmp_path)
    assert code != 0 and not (tmp_path / "network.json").exists(), out[-3000:]
    message = json.loads((tmp_path / "termination").read_text())
    assert message["reason"] == "NetworkUnreachable" and message["exitCode"] == 72, message
    text = message["message"]
    assert "pod nc-r0-0-pod (rank 0) could not complete the ring exchange with" in text, text
    assert "(rank 1)" in text and "over gloo within 5s" in text, text


def test_a_probe_stopped_by_sigterm_exits_at_once() -> None:
    """The probe is the container's PID 1 until it execs torchrun, and PID 1 ignores a signal it has no
    handler for: a pod deleted while rank 0 is still starting must not wait out its grace period."""
    code = "import sys; from kubetune_trainer import reach; sys.exit(reach.main())"
    args = [
        "--",
        "torchrun",
        "--node-rank",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "waiting:" in proc.stderr.readline()  # probing: refused, rank 0 not listening yet
    proc.terminate()
    assert proc.wait(timeout=5) == 143
