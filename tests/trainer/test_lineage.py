"""Lineage: the base model's resolved revision, the data's identity and sha256 as this run fetched them, the
kubetune version and trainer image, in metrics.json (its one home) and the OCI manifest's annotations."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Hub, repo_from_dir
from kubetune.api.contract import ExitCode
from kubetune.api.models import FineTuneJobSpec, StorageSpec
from kubetune.api.storage import s3_client
from kubetune_trainer import lineage, publish, storage
from trainer_helpers import TINY_MODEL, job_spec


def test_a_local_model_is_identified_by_the_sha256_of_its_config_and_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path, **{"model.source": str(model)}))
    first = lineage.base_model(spec)
    assert first["identity"] == storage.IDENTITIES[str(model)] and first["identity"].startswith("local:")
    assert set(first["files"]) >= {"config.json", "model.safetensors"}
    assert "tokenizer.json" not in first["files"]  # config and weights: what the model is
    assert (
        first["files"]["model.safetensors"]
        == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    )
    (model / "tokenizer.json").write_text("{}")  # not part of the digest
    assert lineage.base_model(spec)["sha256"] == first["sha256"]
    with (model / "model.safetensors").open("ab") as f:  # one byte more in the weights: another model
        f.write(b"\0")
    again = lineage.base_model(spec)
    # a local model rewritten after the run fetched it: the record says so (its sha256 is of the new bytes)
    assert again["sha256"] != first["sha256"] and again["changedSinceFetched"] is True
    assert "changedSinceFetched" not in first


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    from huggingface_hub import constants

    server = Hub({"acme/tiny-llama": repo_from_dir(TINY_MODEL)}).start()
    monkeypatch.setattr(
        constants, "ENDPOINT", server.endpoint
    )  # read at import time: HF_ENDPOINT is too late
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.stop()


def test_an_hf_model_is_identified_by_the_commit_the_hub_resolved(tmp_path: Path, hub: Hub) -> None:
    spec = FineTuneJobSpec.model_validate(
        job_spec(tmp_path, **{"model.source": "hf://acme/tiny-llama", "model.revision": "main"})
    )
    got = lineage.base_model(spec)
    commit = hub.repos["acme/tiny-llama"].sha
    assert got == {"source": "hf://acme/tiny-llama", "revision": "main", "identity": f"commit:{commit}"}
    assert lineage.revision(got) == commit


def test_every_dataset_file_is_hashed_from_the_copy_the_run_read(tmp_path: Path) -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path))
    train = tmp_path / "train.jsonl"
    data = lineage.dataset_files(spec)
    assert data[0] == {
        "uri": str(train),
        "identity": storage.IDENTITIES[str(train)],
        "files": {"train.jsonl": hashlib.sha256(train.read_bytes()).hexdigest()},
    }
    assert data[1]["uri"].endswith("eval.jsonl") and len(next(iter(data[1]["files"].values()))) == 64


def test_a_dataset_replaced_in_s3_after_the_run_fetched_it_is_recorded_as_read(
    tmp_path: Path, s3_endpoint: str
) -> None:
    """The lineage hashes the copy the run trained on, never a new fetch: an object replaced at the same URI
    while the job trained is not what the model was made from."""
    client = s3_client(StorageSpec(endpoint=s3_endpoint))
    client.create_bucket(Bucket="lineage")
    client.put_object(Bucket="lineage", Key="d/train.jsonl", Body=b'{"text": "trained on"}\n')
    uri = "s3://lineage/d/train.jsonl"
    spec = FineTuneJobSpec.model_validate(
        job_spec(tmp_path, **{"dataset.train": uri, "dataset.eval": None, "storage.endpoint": s3_endpoint})
    )
    storage.fetch(uri, spec.storage, "spec.dataset.train", ExitCode.DATASET_INVALID)
    client.put_object(Bucket="lineage", Key="d/train.jsonl", Body=b'{"text": "replaced"}\n')
    [entry] = lineage.dataset_files(spec)
    assert entry["identity"].startswith("etag:")
    assert entry["files"] == {"train.jsonl": hashlib.sha256(b'{"text": "trained on"}\n').hexdigest()}


def test_the_trainer_image_digest_is_recorded_when_the_reference_pins_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "ghcr.io/kubetune/trainer:0.1.0")
    assert lineage.trainer_image() == {"trainerImage": "ghcr.io/kubetune/trainer:0.1.0"}
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "r.example/trainer@sha256:" + "b" * 64)
    assert lineage.trainer_image()["trainerImageDigest"] == "sha256:" + "b" * 64


def test_the_lineage_goes_into_the_oci_manifest_annotations() -> None:
    record = {"baseModel": {"source": "hf://acme/tiny", "identity": "commit:" + "c" * 40}, "kubetuneVersion": "0.1.0",
              "datasets": [{"uri": "s3://d/train.jsonl", "identity": "etag:abc", "files": {"train.jsonl": "a" * 64}}],
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
