"""The images the e2e node runs are operator_image/Dockerfile's and trainer_image/Dockerfile's builds (buildah, no
daemon), and the operator's runs under containerd + runc.

The builds are `harness.images.build_dockerfiles` (e2e/README.md, "Images"): each Dockerfile on a local base given
as its base build argument (a Debian base for the operator; for the trainer, a stand-in for the public PyTorch
base: Debian + python3 + the torch the test venv has), their pip steps from a wheelhouse of pip's cache. .ci/run
starts them in the background (`python -m harness.images --prebuild`), so here they are usually in buildah's
layer cache. Every training job of the suite runs on the trainer image checked here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import kubetune
import pytest
from harness import images
from harness.kubelet_node import KubeletNode, _debian_binaries
from harness.netns import Namespace

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_operator_dockerfile_builds_with_buildah_and_runs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation and the namespace need root")
    for tool in ("buildah", "mmdebstrap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (apt-get install {tool}; .ci/run does)")
    _debian_binaries()  # containerd, runc: raises naming what is missing
    [image] = images.build_dockerfiles(("operator",))
    assert isinstance(image, images.LayoutImage)
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


def _created_by(config: dict[str, Any]) -> str:
    return "\n".join(str(h.get("created_by", "")) for h in config.get("history", []))


def test_the_node_runs_the_dockerfiles_builds(kubelet_node: Any) -> None:
    """The node's operator and trainer images are the Dockerfiles' outputs (same manifest digests as buildah's
    push), and the trainer's config and history come from trainer_image/Dockerfile on the stand-in base."""
    op_name, trainer_name = images.chart_images()
    built = {i.name: i for i in kubelet_node.built}
    have = images._image_refs(kubelet_node.ns.argv(kubelet_node.ctr))
    for name in (op_name, trainer_name):
        image = built[name]
        assert isinstance(image, images.LayoutImage), f"{name} is not a Dockerfile build: {image}"
        assert have[name] == image.manifest()[0], f"the node's {name} is not the Dockerfile's output"
    trainer = built[trainer_name]
    assert isinstance(trainer, images.LayoutImage)
    config = trainer.image_config()
    standin = images.standin_image()
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "kubetune trainer"
    assert labels["org.opencontainers.image.base.name"] == standin.name  # the BASE build argument
    assert labels["io.kubetune.stands-in-for"] == images.TRAINER_PUBLIC_BASE  # inherited from the stand-in
    assert config["config"]["User"] == "1000:1000"
    assert config["config"]["Entrypoint"] == ["python", "-m", "kubetune_trainer.launch"]
    history = _created_by(config)
    dockerfile = (ROOT / "trainer_image" / "Dockerfile").read_text()
    for step in ("python3 -m venv --system-site-packages $VIRTUAL_ENV", "python .ci/requirements.py trainer"):
        assert step in dockerfile and step in history, step
    # the stand-in's layers come first, unchanged (torch was not installed again); the Dockerfile's follow
    layers = [m.removeprefix("sha256:") for m in config["rootfs"]["diff_ids"]]
    standin.manifest()
    assert layers[: len(standin.layers)] == [standin._layer_digest(p) for p in standin.layers]
    assert len(layers) > len(standin.layers)
