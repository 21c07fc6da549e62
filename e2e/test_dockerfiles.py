"""operator_image/Dockerfile, built as a user builds it (buildah, no daemon), and run under containerd + runc.

The build is the one `harness.images.build_dockerfiles` makes (e2e/README.md, "Images"): the Dockerfile on the
locally made Debian base (its PYTHON_IMAGE build argument), its pip steps from a wheelhouse of pip's cache;
.ci/run starts it in the background (`python -m harness.images --prebuild`), so here it is usually found in
buildah's layer cache. The image is imported into a containerd of its own, in a private network + mount
namespace like the real node's, and run: the entrypoint answers with this checkout's version, as the uid the
chart's securityContext requires. (The trainer's Dockerfile is built the same way with
KUBETUNE_E2E_IMAGES=dockerfiles; its torch layer needs about 20 GB of free disk at its peak, so it is not
built in every run yet.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import kubetune
import pytest
from harness import images
from harness.kubelet_node import KubeletNode, _debian_binaries
from harness.netns import Namespace


@pytest.mark.slow
def test_operator_dockerfile_builds_with_buildah_and_runs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation and the namespace need root")
    for tool in ("buildah", "mmdebstrap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (apt-get install {tool}; .ci/run does)")
    _debian_binaries()  # containerd, runc: raises naming what is missing
    [image] = images.build_dockerfiles(("operator",))
    assert image.name == images.chart_images()[0]

    class Holder:  # what KubeletNode needs of a cluster to run its containerd: the namespace
        ns = Namespace(tmp_path / "netns")

    Holder.ns.start()
    node = KubeletNode(Holder, tmp_path / "node", pause_only=True)
    try:
        node.dir.mkdir(parents=True)
        node.ctr_sock = node.dir / "containerd.sock"
        node.ctr = ["ctr", "--address", str(node.ctr_sock)]
        node._containerd(node.dir / "containerd-root")
        ctr = Holder.ns.argv(node.ctr)
        images.import_all([image], ctr)

        def run(name: str, *argv: str) -> str:
            return Holder.ns.run([*node.ctr, "-n", "k8s.io", "run", "--rm", image.name, name, *argv]).stdout

        assert (
            run("version", "kubetune", "version", "--client").strip()
            == f"Client Version: {kubetune.__version__}"
        )
        assert run("uid", "id", "-u").strip() == "1000"
        # the requirements pyproject.toml declares for the operator are installed, kopf among them
        assert "kopf" in run("pip", "pip", "list", "--format=freeze").lower()
    finally:
        node.stop()
        assert Holder.ns.stop() == []
