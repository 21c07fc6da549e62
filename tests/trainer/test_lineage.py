"""Lineage: the base model's resolved revision, the data's sha256, the kubetune version and trainer image,
in metrics.json and the OCI manifest's annotations."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from hub_server import Hub, repo_from_dir
from kubetune.api.models import FineTuneJobSpec
from kubetune_trainer import lineage, publish
from trainer_helpers import TINY_MODEL, job_spec


def test_a_local_model_is_identified_by_the_sha256_of_its_config_and_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path, **{"model.source": str(model)}))
    first = lineage.base_model(spec, model)
    assert "commit" not in first and set(first["files"]) >= {"config.json", "model.safetensors"}
    assert "tokenizer.json" not in first["files"]  # config and weights: what the model is
    assert (
        first["files"]["model.safetensors"]
        == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    )
    (model / "tokenizer.json").write_text("{}")  # not part of the digest
    assert lineage.base_model(spec, model)["sha256"] == first["sha256"]
    with (model / "model.safetensors").open("ab") as f:  # one byte more in the weights: another model
        f.write(b"\0")
    assert lineage.base_model(spec, model)["sha256"] != first["sha256"]


def test_an_hf_model_is_identified_by_the_commit_the_hub_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import snapshot_download

    with Hub({"acme/tiny-llama": repo_from_dir(TINY_MODEL)}) as hub:
        local = Path(
            snapshot_download(
                "acme/tiny-llama", revision="main", endpoint=hub.endpoint, local_dir=str(tmp_path / "dl")
            )
        )
    spec = FineTuneJobSpec.model_validate(
        job_spec(tmp_path, **{"model.source": "hf://acme/tiny-llama", "model.revision": "main"})
    )
    got = lineage.base_model(spec, local)
    assert got == {
        "source": "hf://acme/tiny-llama",
        "revision": "main",
        "commit": hub.repos["acme/tiny-llama"].sha,
    }


def test_every_dataset_file_is_hashed(tmp_path: Path) -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path))
    data = lineage.dataset_files(spec)
    train = tmp_path / "train.jsonl"
    assert data[0] == {
        "uri": str(train),
        "files": {"train.jsonl": hashlib.sha256(train.read_bytes()).hexdigest()},
    }
    assert data[1]["uri"].endswith("eval.jsonl") and len(next(iter(data[1]["files"].values()))) == 64


def test_the_trainer_image_digest_is_recorded_when_the_reference_pins_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "ghcr.io/kubetune/trainer:0.1.0")
    assert lineage.trainer_image() == {"trainerImage": "ghcr.io/kubetune/trainer:0.1.0"}
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "r.example/trainer@sha256:" + "b" * 64)
    assert lineage.trainer_image()["trainerImageDigest"] == "sha256:" + "b" * 64


def test_the_lineage_goes_into_the_oci_manifest_annotations() -> None:
    record = {"baseModel": {"source": "hf://acme/tiny", "commit": "c" * 40}, "kubetuneVersion": "0.1.0",
              "datasets": [{"uri": "s3://d/train.jsonl", "files": {"train.jsonl": "a" * 64}}],
              "trainerImage": "r/t@sha256:" + "e" * 64, "trainerImageDigest": "sha256:" + "e" * 64}  # fmt: skip
    annotations = lineage.oci_annotations(record)
    assert (
        annotations["io.kubetune.base-model.revision"] == "c" * 40
        and annotations["org.opencontainers.image.version"] == "0.1.0"
    )
    assert annotations["io.kubetune.datasets"].startswith("s3://d/train.jsonl@sha256:")
    body = publish.manifest([], b"{}", annotations)
    assert body["annotations"] == dict(sorted(annotations.items()))
    assert publish.manifest([], b"{}", annotations) == body  # nothing depends on the clock
