"""Content-addressed inputs: the node cache is keyed by what the bytes are (S3 ETag and version id, the hub's
commit, a local file's identity), so an input replaced at the same URI is fetched (and tokenized) again;
each identity is recorded for metrics.json and the model card. S3 is moto's server on loopback, the hub a
loopback hub (hub_server.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Hub, Repo
from kubetune.api.contract import ExitCode
from kubetune.api.models import StorageSpec
from kubetune_trainer import data, storage


def test_an_s3_object_replaced_at_the_same_uri_is_fetched_again(s3_endpoint: str) -> None:
    spec = StorageSpec(endpoint=s3_endpoint)
    client = storage.s3_client(spec)
    client.create_bucket(Bucket="replaced")
    client.put_object(Bucket="replaced", Key="d/train.jsonl", Body=b'{"text": "old tokens"}\n')
    first = storage.fetch("s3://replaced/d/train.jsonl", spec, "spec.dataset.train", ExitCode.DATASET_INVALID)
    old_identity = storage.IDENTITIES["s3://replaced/d/train.jsonl"]
    client.put_object(Bucket="replaced", Key="d/train.jsonl", Body=b'{"text": "new tokens"}\n')  # same size

    second = storage.fetch(
        "s3://replaced/d/train.jsonl", spec, "spec.dataset.train", ExitCode.DATASET_INVALID
    )

    assert (
        first.read_bytes() == b'{"text": "old tokens"}\n'
        and second.read_bytes() == b'{"text": "new tokens"}\n'
    )
    assert storage.IDENTITIES["s3://replaced/d/train.jsonl"] != old_identity
    assert old_identity.startswith("etag:")
    assert data._fingerprint(first) != data._fingerprint(second)  # and tokenized again


def test_a_versioned_bucket_pins_the_version_it_lists(s3_endpoint: str) -> None:
    spec = StorageSpec(endpoint=s3_endpoint)
    client = storage.s3_client(spec)
    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket="versioned", Key="m/config.json", Body=b"{}")
    put = client.put_object(Bucket="versioned", Key="m/weights.bin", Body=b"v2")

    path = storage.fetch("s3://versioned/m", spec, "spec.model.source", ExitCode.MODEL_NOT_FOUND)
    objects = storage.s3_objects(client, "versioned", "m")

    assert (path / "weights.bin").read_bytes() == b"v2"
    assert {o["Key"]: o["VersionId"] for o in objects}["m/weights.bin"] == put["VersionId"]
    assert storage.IDENTITIES["s3://versioned/m"].startswith("etags:")


def test_a_same_size_rewrite_with_the_old_mtime_is_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "old tokens"}\n')
    before = path.stat()
    identity = storage.local_identity(path)
    key = data._fingerprint(path)
    path.write_text('{"text": "new tokens"}\n')
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns

    assert storage.local_identity(path) != identity
    assert data._fingerprint(path) != key


def test_a_large_local_file_is_sampled_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * (4 << 20))
    identity = storage.local_identity(path)
    with open(path, "r+b") as handle:  # one byte inside the first sampled block, size and mtime put back
        mtime = path.stat().st_mtime_ns
        handle.write(b"b")
    os.utime(path, ns=(mtime, mtime))
    assert storage.local_identity(path) != identity


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    from huggingface_hub import constants

    with Hub({"acme/data": Repo({"train.jsonl": b'{"text": "a"}\n'}, sha="a" * 40)}) as server:
        # read at import time: HF_ENDPOINT is too late here
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield server


def test_a_hub_branch_that_moved_is_fetched_again(hub: Hub) -> None:
    first = storage.fetch(
        "hf://acme/data", StorageSpec(), "spec.dataset.train", ExitCode.DATASET_INVALID, "main"
    )
    assert storage.IDENTITIES["hf://acme/data"] == "commit:" + "a" * 40
    hub.repos["acme/data"] = Repo({"train.jsonl": b'{"text": "b"}\n'}, sha="b" * 40)  # a new commit on main

    second = storage.fetch(
        "hf://acme/data", StorageSpec(), "spec.dataset.train", ExitCode.DATASET_INVALID, "main"
    )

    assert (first / "train.jsonl").read_bytes() == b'{"text": "a"}\n'
    assert (second / "train.jsonl").read_bytes() == b'{"text": "b"}\n'
    assert storage.IDENTITIES["hf://acme/data"] == "commit:" + "b" * 40


def test_an_s3_output_belongs_to_the_job_that_wrote_it_first(s3_endpoint: str, tmp_path: Path) -> None:
    """Owned outputs on S3 (the owner record written with If-None-Match): the same job again is its owner,
    another job is refused naming it."""
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.api.trainer_config import JobRef, TrainerConfig
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.owner import OutputClaim
    from trainer_helpers import job_spec

    storage.s3_client(StorageSpec(endpoint=s3_endpoint)).create_bucket(Bucket="owned")
    spec = FineTuneJobSpec.model_validate(
        job_spec(tmp_path, **{"output.uri": "s3://owned/run", "storage": {"endpoint": s3_endpoint}})
    )

    def claim(uid: str) -> dict:
        config = TrainerConfig(
            job=JobRef(name=uid, namespace="ml", uid=uid),
            spec=spec,
            world_size=1,
            gradient_accumulation_steps=1,
        )
        return OutputClaim(storage.OutputStore(spec.output.uri, spec.storage), config).acquire(config)

    assert claim("uid-a")["uid"] == "uid-a"
    assert claim("uid-a")["uid"] == "uid-a"  # a restart of the same job resumes
    with pytest.raises(TrainerError) as caught:
        claim("uid-b")
    assert (
        caught.value.exit_code == ExitCode.CONFIG_INVALID
        and "belongs to job ml/uid-a (uid uid-a, run 1)" in caught.value.message
    )
