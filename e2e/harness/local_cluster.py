"""`make cluster` / `make cluster-down`: the e2e harness as a local cluster that stays up.

    python -m harness.local_cluster up       # start it in the background, print how to reach it
    python -m harness.local_cluster env      # export lines: KUBECONFIG and MinIO's AWS_* variables
    python -m harness.local_cluster down     # stop it and remove everything it made

What runs (all of it from e2e/harness, as the e2e suite runs it): the control plane and one real node
(containerd + kubelet + kube-scheduler + CoreDNS) inside a private network + mount namespace; MinIO and
the OCI registry on the host's loopback, carried into the namespace (pods reach MinIO at
http://10.0.0.20:9000, the registry at 10.0.0.20:5000); the operator installed by Helm from the chart
with its default values, so it runs the images that operator_image/Dockerfile and trainer_image/Dockerfile
build (harness/images.py, imported into the node's containerd). The host reaches the API server on a
loopback port through the harness's forwarders, so the printed kubeconfig works for kubectl and
kubetune from the host; nothing on the host's network, iptables or sysctls changes.

The cluster's state lives in $KUBETUNE_CLUSTER_DIR (default ~/.local/state/kubetune/cluster): the
kubeconfig, `env`, `cluster.log` and every component's files; `down` removes the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RELEASE, RELEASE_NS = "kubetune", "kubetune-system"
BUCKET = "kubetune"
S3_PORT, REGISTRY_PORT = 9000, 5000  # where pods reach MinIO and the registry (at 10.0.0.20)
START_TIMEOUT = 3600  # a cold start builds the Go binaries (about 25 minutes on 2 cores) and the images first


def state_dir() -> Path:
    d = os.environ.get("KUBETUNE_CLUSTER_DIR")
    return Path(d) if d else Path.home() / ".local" / "state" / "kubetune" / "cluster"


class Missing(SystemExit):
    """What this machine lacks, as one line (exit 1, nothing started)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"make cluster: {what}")


def preflight() -> None:
    """Root, the kernel features and the tools the real node needs; raises Missing naming the first gap."""
    if os.geteuid() != 0:
        raise Missing(
            "needs root (the node runs containerd and runc in a private network + mount namespace): run it as root"
        )
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise Missing(
            "the kernel has no overlay filesystem (containerd's snapshotter and buildah need it): modprobe overlay"
        )
    if not (Path("/sys/fs/cgroup/cgroup.controllers").exists() or Path("/sys/fs/cgroup/cpu").exists()):
        raise Missing("no cgroup filesystem at /sys/fs/cgroup (the kubelet needs one)")
    r = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        raise Missing(
            "cannot create a network + mount namespace (`unshare --net --mount` failed: "
            f"{r.stderr.strip() or r.returncode}); a container needs CAP_SYS_ADMIN for it"
        )
    tools = {
        "containerd": "containerd",
        "runc": "runc",
        "buildah": "buildah",
        "mmdebstrap": "mmdebstrap",
        os.environ.get("KUBETUNE_E2E_KUBECTL", "/usr/bin/kubectl"): "kubectl",
    }
    missing = [pkg for tool, pkg in tools.items() if not shutil.which(tool)]
    if not os.access("/usr/lib/cni/bridge", os.X_OK):
        missing.append("containernetworking-plugins")
    if missing:
        raise Missing(f"missing {', '.join(missing)}: apt-get install {' '.join(missing)}")


def _running(d: Path) -> int | None:
    """The pid of the cluster process holding <d>/lock, or None."""
    lock = d / "lock"
    if not lock.exists():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = (d / "pid").read_text().strip() if (d / "pid").exists() else "?"
            return int(pid) if pid.isdigit() else -1
    return None


def exports(d: Path) -> str:
    return (d / "env").read_text()


def up() -> int:
    preflight()
    d = state_dir()
    pid = _running(d)
    if pid is not None:
        print(f"a cluster is already running (pid {pid}, {d}); to use it:", file=sys.stderr)
        print(exports(d) if (d / "ready").exists() else f"# still starting: see {d / 'cluster.log'}", end="")
        return 0
    if d.exists():  # a cluster that died without cleaning up (a reboot, SIGKILL): its files only
        shutil.rmtree(d)
    d.mkdir(parents=True)
    log = open(d / "cluster.log", "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.local_cluster", "serve"],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # outlives `make`, and Ctrl-C in this terminal
        env={**os.environ, "KUBETUNE_CLUSTER_DIR": str(d)},
    )
    print(
        f"starting the cluster (log: {d / 'cluster.log'}; a first start builds the images: minutes) ...",
        file=sys.stderr,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not (d / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
            tail = (d / "cluster.log").read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            print(
                f"make cluster: the cluster did not start (exit {proc.returncode}); nothing is left running",
                file=sys.stderr,
            )
            shutil.rmtree(d, ignore_errors=True)
            return 1
        time.sleep(1)
    print(exports(d), end="")
    return 0


def down() -> int:
    d = state_dir()
    pid = _running(d)
    if pid is None:
        shutil.rmtree(d, ignore_errors=True)
        print("no cluster running", file=sys.stderr)
        return 0
    if pid > 0:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 180
    while _running(d) is not None:
        if time.monotonic() > deadline:
            if pid > 0:
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    leftovers = (d / "leftovers").read_text() if (d / "leftovers").exists() else ""
    shutil.rmtree(d, ignore_errors=True)
    if leftovers:
        print(f"make cluster-down: could not remove: {leftovers}", file=sys.stderr)
        return 1
    print("cluster stopped and removed", file=sys.stderr)
    return 0


def serve() -> None:
    """The cluster's own process: start everything, write `ready`, run until SIGTERM, stop everything."""
    from .cluster import Cluster  # noqa: PLC0415
    from .kubelet_node import KubeletNode  # noqa: PLC0415
    from .netns import Namespace  # noqa: PLC0415
    from .registry import Registry  # noqa: PLC0415
    from .s3 import S3Server  # noqa: PLC0415

    d = state_dir()
    lock = open(d / "lock", "w")  # noqa: SIM115 - held for the process's life
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (d / "pid").write_text(str(os.getpid()))
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    t0 = time.monotonic()
    cluster = Cluster(d / "cluster", ns=Namespace(d / "netns"))
    node = KubeletNode(cluster, d / "node")
    s3 = S3Server(d / "s3", bucket=BUCKET, kind="minio")
    registry = Registry(d / "registry")
    try:
        with cluster, node, s3, registry:
            pods_s3 = node.expose(s3.port, S3_PORT)
            node.expose(registry.port, REGISTRY_PORT)
            _seed(s3)
            _helm_install(cluster)
            shutil.copy(cluster.kubeconfig, d / "kubeconfig")
            env = {
                "KUBECONFIG": str(d / "kubeconfig"),
                **{k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                "AWS_ENDPOINT_URL": s3.endpoint,  # MinIO as this machine reaches it
            }
            lines = [f"export {k}={v}" for k, v in env.items()]
            lines.append(
                f"# pods reach MinIO at http://{pods_s3} (bucket {BUCKET}); `make cluster-down` removes it all"
            )
            (d / "env").write_text("\n".join(lines) + "\n")
            (d / "ready").write_text(json.dumps({"seconds": round(time.monotonic() - t0)}))
            print(f"cluster ready in {time.monotonic() - t0:.0f}s", flush=True)
            while not stop:
                time.sleep(0.5)
                for p in (*cluster.procs, *node.procs):
                    p.check()
    finally:
        if cluster.leftovers:
            (d / "leftovers").write_text("; ".join(cluster.leftovers))
        print("cluster stopped", flush=True)


def _seed(s3: Any) -> None:
    """The quickstart's tiny model and data (examples/data) into s3://kubetune/data/, for the tutorial's job."""
    client = s3.client()
    data = REPO / "examples" / "data"
    for sub in ("tiny-llama", "spell-digits"):
        for f in sorted((data / sub).iterdir()):
            client.upload_file(str(f), BUCKET, f"data/{sub}/{f.name}")


def _helm_install(cluster: Any) -> None:
    """The chart with its default values (its default images are the ones built here), one replica."""
    helm = str(binaries.ensure("helm")["helm"])
    subprocess.run(
        [helm, "--kubeconfig", str(cluster.kubeconfig), "install", RELEASE, str(CHART), "--namespace", RELEASE_NS,
         "--create-namespace", "--set", "replicas=1", "--wait", "--timeout", "300s"],
        check=True,
        timeout=360,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "up"
    if cmd == "up":
        return up()
    if cmd == "down":
        return down()
    if cmd == "env":
        d = state_dir()
        if _running(d) is None or not (d / "ready").exists():
            print("make cluster-env: no cluster running (make cluster)", file=sys.stderr)
            return 1
        print(exports(d), end="")
        return 0
    if cmd == "serve":
        serve()
        return 0
    print(f"usage: python -m harness.local_cluster up|env|down (not {cmd!r})", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
