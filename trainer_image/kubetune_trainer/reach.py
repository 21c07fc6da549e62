"""Before torchrun: can this pod reach rank 0's rendezvous port? Then exec torchrun (it becomes the process).

    python -m kubetune_trainer.reach --timeout-seconds 20 -- torchrun --nnodes 2 ... --node-rank 1 \\
        --master-addr job-r0-0.job --master-port 29500 -m kubetune_trainer --config ...

torchrun's rendezvous (the TCPStore on rank 0's --master-port) runs before any trainer code: a worker that
cannot reach it waits there for torchrun's join timeout (15 minutes) and says nothing. This probe runs
first on every pod but rank 0's: it connects to the port until it answers, then execs torchrun unchanged.

- the name does not resolve yet, or the connection is refused (rank 0's pod is up, its torchrun not yet):
  rank 0 is still starting; keep trying (after --wait-seconds, hand over to torchrun, which waits as before);
- the connection times out (a NetworkPolicy or firewall dropping the packets) or the route is refused
  (host or network unreachable) for --timeout-seconds in a row: exit NETWORK_UNREACHABLE with a
  termination message naming both pods and the port. No retry helps: the network must change.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubetune.api.contract import ENV_POD_NAME, ExitCode

CONNECT_SECONDS = 2.0  # one attempt: a pod's answer (accept or refuse) comes in milliseconds
PAUSE_SECONDS = 0.5
WAIT_SECONDS = 900  # torchrun's own join timeout: how long rank 0 may take to start listening
BLOCKED = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EACCES, errno.EPERM)
"""What a route or a filter answers (EACCES/EPERM: a local firewall rejecting the packet)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    node_rank: str


def target_of(torchrun_args: list[str]) -> Target | None:
    """rank 0's address from torchrun's own arguments (`--flag value` or `--flag=value`); None without one."""
    found: dict[str, str] = {}
    for i, arg in enumerate(torchrun_args):
        name, sep, value = arg.partition("=")
        if name in (
            "--master-addr",
            "--master_addr",
            "--master-port",
            "--master_port",
            "--node-rank",
            "--node_rank",
        ):
            found[name.replace("_", "-")] = (
                value if sep else (torchrun_args[i + 1] if i + 1 < len(torchrun_args) else "")
            )
    if "--master-addr" not in found:
        return None
    return Target(
        found["--master-addr"], int(found.get("--master-port", "29500")), found.get("--node-rank", "0")
    )


def attempt(target: Target) -> str | None:
    """One connection: None when it was accepted, else 'waiting: <why>' or 'blocked: <why>'."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"waiting: {target.host} does not resolve yet ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(CONNECT_SECONDS)
        try:
            sock.connect(address)
            return None
        except ConnectionRefusedError:
            return f"waiting: {address[0]}:{target.port} refused the connection (rank 0 not listening yet)"
        except TimeoutError:
            return f"blocked: connecting to {address[0]}:{target.port} timed out (packets dropped)"
        except OSError as exc:
            if exc.errno in BLOCKED:
                return f"blocked: connecting to {address[0]}:{target.port}: {exc.strerror}"
            return f"waiting: connecting to {address[0]}:{target.port}: {exc.strerror}"


def probe(
    target: Target, timeout: float, wait: float, connect: Callable[[Target], str | None] = attempt
) -> str | None:
    """Try until the port answers (None) or has been blocked for `timeout` seconds in a row (the last
    answer). After `wait` seconds of rank 0 not yet listening, None: torchrun takes over."""
    start = time.monotonic()
    blocked_since: float | None = None
    said = False  # the first wait is logged, once
    while True:
        answer = connect(target)
        now = time.monotonic()
        if answer is None:
            return None
        if answer.startswith("blocked"):
            blocked_since = blocked_since if blocked_since is not None else now
            if now - blocked_since >= timeout:
                return answer.removeprefix("blocked: ")
        else:
            if not said:
                print(f"[kubetune] {answer}", file=sys.stderr, flush=True)
                said = True
            blocked_since = None
            if now - start >= wait:
                return None
        time.sleep(PAUSE_SECONDS)


def unreachable_message(target: Target, why: str, timeout: float) -> str:
    me = os.environ.get(ENV_POD_NAME) or socket.gethostname()
    try:
        ipaddress.ip_address(target.host)
        rank0 = "rank 0"
    except ValueError:  # <job>-r<n>-0.<service>: the pod's hostname first
        rank0 = f"rank 0's pod {target.host.split('.')[0]}"
    return (
        f"pod {me} (node rank {target.node_rank}) cannot reach {rank0} at {target.host} "
        f"port {target.port} (torchrun's rendezvous) for {timeout:g}s: {why}. A NetworkPolicy or firewall "
        "blocks TCP between the gang's pods: allow every TCP port among them (rendezvous "
        f"{target.port}, and the ephemeral ports gloo and NCCL connect on); see docs/distributed.md#network-policy"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer.reach", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-seconds", type=float, default=20.0)
    parser.add_argument("--wait-seconds", type=float, default=WAIT_SECONDS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- torchrun ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    target = target_of(command[1:])
    for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1 a signal without a handler is ignored
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))  # exec restores the default
    if target is not None and target.node_rank not in ("0", ""):
        why = probe(target, args.timeout_seconds, args.wait_seconds)
        if why is not None:
            from kubetune_trainer.errors import write_termination_message

            message = unreachable_message(target, why, args.timeout_seconds)
            print(f"[kubetune] error: {message}", file=sys.stderr, flush=True)
            write_termination_message(ExitCode.NETWORK_UNREACHABLE, message)
            return int(ExitCode.NETWORK_UNREACHABLE)
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
