"""Run the e2e environment interactively: `cd e2e && ../.venv/bin/python -m harness [workdir]`.

Starts the control plane, the node agent and MinIO, prints how to reach them, and
keeps running until Ctrl-C (then stops everything and restores /etc/hosts).
"""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
from pathlib import Path

from .cluster import Cluster
from .node_agent import for_cluster
from .s3 import S3Server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kubetune-e2e-"))
    with Cluster(workdir / "cluster") as cluster, S3Server(workdir / "s3") as s3:
        with for_cluster(cluster, workdir / "node"):
            print(f"export KUBECONFIG={cluster.kubeconfig}")
            for k, v in s3.env().items():
                print(f"export {k}={v}")
            print(f"# bucket: {s3.bucket}; pod logs: {workdir / 'node' / 'pods'}; Ctrl-C to stop", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
