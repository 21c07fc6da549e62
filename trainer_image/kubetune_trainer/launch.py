"""torchrun with the trainer's exit code passed through: the image's default entry point for
`docker run` by hand, and the launcher the trainer tests use. (In a cluster the operator renders
plain `torchrun`; it reads the failing rank's ExitCode from the termination message instead.)

    python -m kubetune_trainer.launch --nnodes 2 --nproc-per-node 8 --node-rank 0 \\
        --master-addr job-0.job --master-port 29500 -m kubetune_trainer --config /etc/kubetune/trainer-config.yaml

Arguments go to `torch.distributed.run` unchanged. torchrun itself exits 1 whenever a
rank fails, which hides the reason; this wrapper exits with the code the failing rank
recorded in its termination message (ExitCode). SIGTERM and SIGINT are forwarded to torchrun,
which forwards them to the ranks (they checkpoint and exit 143).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kubetune.api.contract import ENV_TERMINATION_LOG, TERMINATION_LOG, ExitCode, TerminationMessage


def exit_code_from(rc: int, message_path: Path) -> int:
    if rc == 0:
        return 0
    message = TerminationMessage.read(message_path)
    if message is not None:
        return message.exit_code
    return int(ExitCode.INFRASTRUCTURE) if rc in (1, -9, 137) else rc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    final = os.environ.get(ENV_TERMINATION_LOG) or TERMINATION_LOG
    scratch = Path(tempfile.mkdtemp(prefix="kubetune-launch-")) / "termination-log"
    env = {**os.environ, ENV_TERMINATION_LOG: str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    rc = proc.wait()
    code = exit_code_from(rc, scratch)
    if scratch.exists():
        target = Path(final)
        if final != TERMINATION_LOG or target.exists():
            try:
                target.write_text(scratch.read_text())
            except OSError:
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
