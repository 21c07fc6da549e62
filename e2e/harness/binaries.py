"""Where build.sh caches the pinned e2e binaries, and building them on demand."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"


class BinariesUnavailable(RuntimeError):
    """The binaries are missing and building is disabled (KUBETUNE_E2E_BUILD=0)."""


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_E2E_CACHE", Path.home() / ".cache" / "kubetune-e2e"))


def _paths() -> dict[str, Path]:
    v, c = versions(), cache_dir()
    k8s = c / f"kubernetes-{v['KUBERNETES_VERSION']}" / "bin"
    node = c / f"kubernetes-node-{v['KUBERNETES_VERSION']}" / "bin"
    return {
        "kube-apiserver": k8s / "kube-apiserver",
        "kube-controller-manager": k8s / "kube-controller-manager",
        "etcd": c / f"etcd-{v['ETCD_VERSION']}" / "bin" / "etcd",
        "helm": c / f"helm-{v['HELM_VERSION']}" / "bin" / "helm",
        "minio": c / f"minio-{v['MINIO_VERSION']}" / "bin" / "minio",
        "kubelet": node / "kubelet",
        "kube-scheduler": node / "kube-scheduler",
        "pause": node / "pause",
        "coredns": c / f"coredns-{v['COREDNS_VERSION']}" / "bin" / "coredns",
        "registry": c / f"registry-{v['REGISTRY_VERSION']}" / "bin" / "registry",
        "kueue": c / f"kueue-{v['KUEUE_VERSION']}" / "bin" / "kueue",
        "coscheduling": c / f"coscheduling-{v['SCHEDULER_PLUGINS_VERSION']}" / "bin" / "kube-scheduler",
    }


COMPONENT = {  # binary -> build.sh component
    "kube-apiserver": "kubernetes",
    "kube-controller-manager": "kubernetes",
    "etcd": "etcd",
    "helm": "helm",
    "minio": "minio",
    "kubelet": "node",
    "kube-scheduler": "node",
    "pause": "node",
    "coredns": "coredns",
    "registry": "registry",
    "kueue": "kueue",
    "coscheduling": "coscheduling",
}


def ensure(*names: str) -> dict[str, Path]:
    """Return paths of the named binaries, running build.sh if any is missing.

    With KUBETUNE_E2E_BUILD=0 a missing binary raises BinariesUnavailable instead.
    """
    paths = _paths()
    missing = [n for n in names if not os.access(paths[n], os.X_OK)]
    if missing:
        if os.environ.get("KUBETUNE_E2E_BUILD", "1") == "0":
            raise BinariesUnavailable(
                f"e2e binaries missing ({', '.join(missing)}) under {cache_dir()} and "
                f"KUBETUNE_E2E_BUILD=0; run {BUILD_SH} first"
            )
        t0 = time.monotonic()
        env = dict(os.environ)
        env.setdefault("KUBETUNE_E2E_COMPONENTS", " ".join(sorted({COMPONENT[n] for n in missing})))
        subprocess.run([str(BUILD_SH)], check=True, env=env)
        print(f"build.sh took {time.monotonic() - t0:.0f}s")
    return {n: paths[n] for n in names}


def kserve_crds() -> Path:
    """The directory with KServe's CRDs (InferenceService, ServingRuntime, ClusterServingRuntime) from the
    pinned kserve module, fetched by build.sh on demand."""
    out = cache_dir() / f"kserve-{versions()['KSERVE_VERSION']}" / "crds"
    if not (out / "serving.kserve.io_inferenceservices.yaml").is_file():
        if os.environ.get("KUBETUNE_E2E_BUILD", "1") == "0":
            raise BinariesUnavailable(
                f"KServe CRDs missing under {out} and KUBETUNE_E2E_BUILD=0; run {BUILD_SH} first"
            )
        subprocess.run([str(BUILD_SH)], check=True, env={**os.environ, "KUBETUNE_E2E_COMPONENTS": "kserve"})
    return out


def crds(component: str) -> Path:
    """The CRDs build.sh keeps beside a component's binary (`kueue`, `coscheduling`), building it on demand."""
    binary = ensure(component)[component]
    return binary.parent.parent / "crds"
