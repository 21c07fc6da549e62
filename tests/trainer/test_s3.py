"""S3 in and out against moto's S3 server on loopback (a real HTTP server, boto3 talking to it)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.api.contract import ExitCode
from kubetune.api.models import StorageSpec
from kubetune_trainer import storage
from kubetune_trainer.errors import TrainerError
from trainer_helpers import SPELL, TINY_MODEL, free_port, job_spec, refused_url, run_trainer, termination


@pytest.fixture(scope="module")
def s3(s3_endpoint: str):  # type: ignore[no-untyped-def]
    client = storage.s3_client(StorageSpec(endpoint=s3_endpoint))
    for bucket in ("models", "data", "out"):
        client.create_bucket(Bucket=bucket)
    for f in TINY_MODEL.iterdir():
        client.upload_file(str(f), "models", f"tiny/{f.name}")
    lines = (SPELL / "train.jsonl").read_text().splitlines()[:128]
    client.put_object(Bucket="data", Key="spell/train.jsonl", Body=("\n".join(lines) + "\n").encode())
    client.upload_file(str(SPELL / "eval.jsonl"), "data", "spell/eval.jsonl")
    return client


def test_model_prefix_downloads_into_node_cache_once(s3, s3_endpoint: str) -> None:
    spec = StorageSpec(endpoint=s3_endpoint)
    path = storage.fetch("s3://models/tiny", spec, "spec.model.source", ExitCode.MODEL_NOT_FOUND)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in TINY_MODEL.iterdir()
    )
    assert storage.fetch("s3://models/tiny", spec, "m", ExitCode.MODEL_NOT_FOUND) == path
    single = storage.fetch("s3://data/spell/train.jsonl", spec, "d", ExitCode.DATASET_INVALID)
    assert single.is_file() and single.name == "train.jsonl"


def test_missing_model_prefix_and_bucket_are_user_errors(s3, s3_endpoint: str) -> None:
    spec = StorageSpec(endpoint=s3_endpoint)
    for uri in ("s3://models/absent", "s3://no-such-bucket/x"):
        with pytest.raises(TrainerError) as err:
            storage.fetch(uri, spec, "spec.model.source", ExitCode.MODEL_NOT_FOUND)
        assert err.value.exit_code == ExitCode.MODEL_NOT_FOUND, err.value.message


def test_large_artifact_uploads_in_parts(s3, s3_endpoint: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(storage.MULTIPART_THRESHOLD * 2 + 1234))
    store = storage.OutputStore("s3://out/multipart", StorageSpec(endpoint=s3_endpoint))
    small = tmp_path / "small.json"
    small.write_text("{}")
    store.put_files([(big, "model/big.bin"), (small, "model/small.json")])
    head = s3.head_object(Bucket="out", Key="multipart/model/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload's ETag counts its parts
    back = tmp_path / "back"
    store.get_dir("model", back)
    assert (back / "big.bin").read_bytes() == big.read_bytes() and (back / "small.json").read_text() == "{}"


@pytest.fixture
def authenticating_s3() -> Iterator[str]:
    """A second moto server that checks access keys (INITIAL_NO_AUTH_ACTION_COUNT=0): every key is unknown to it."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_credentials_are_credentials_invalid(
    authenticating_s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    with pytest.raises(TrainerError) as err:
        storage.fetch(
            "s3://models/tiny",
            StorageSpec(endpoint=authenticating_s3),
            "spec.model.source",
            ExitCode.MODEL_NOT_FOUND,
        )
    assert err.value.exit_code == ExitCode.CREDENTIALS_INVALID
    assert "InvalidAccessKeyId" in err.value.message and "secretRef" in err.value.message


@pytest.mark.slow
def test_trainer_with_bad_credentials_exits_credentials_invalid(
    authenticating_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    spec = job_spec(
        tmp_path, **{"model.source": "s3://models/tiny", "storage": {"endpoint": authenticating_s3}}
    )
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == ExitCode.CREDENTIALS_INVALID, out[-3000:]
    assert termination(tmp_path)["reason"] == "CredentialsInvalid"


def test_refused_session_token_is_credentials_invalid(s3_endpoint: str) -> None:
    """An expired token, replayed with botocore's Stubber (moto does not expire tokens)."""
    from botocore.stub import Stubber

    client = storage.s3_client(StorageSpec(endpoint=s3_endpoint))
    with Stubber(client) as stub:
        stub.add_client_error("list_objects_v2", service_error_code="ExpiredToken", http_status_code=400)
        with pytest.raises(Exception) as raised:
            storage.s3_list(client, "models", "tiny")
    err = storage.classify_s3_error(raised.value, "spec.model.source", ExitCode.MODEL_NOT_FOUND)
    assert err.exit_code == ExitCode.CREDENTIALS_INVALID and "secretRef" in err.message


def test_unreachable_endpoint_is_storage_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # credentials there, so only the endpoint can fail
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with refused_url() as endpoint, pytest.raises(TrainerError) as err:
        storage.fetch(
            "s3://models/tiny", StorageSpec(endpoint=endpoint), "spec.model.source", ExitCode.MODEL_NOT_FOUND
        )
    assert err.value.exit_code == ExitCode.STORAGE_UNAVAILABLE


@pytest.mark.slow
def test_train_from_s3_to_s3(s3, s3_endpoint: str, tmp_path: Path) -> None:
    spec = job_spec(
        tmp_path,
        **{
            "model.source": "s3://models/tiny",
            "dataset.train": "s3://data/spell/train.jsonl",
            "dataset.eval": "s3://data/spell/eval.jsonl",
            "output.uri": "s3://out/run1",
            "storage": {"endpoint": s3_endpoint},
            "training.maxSteps": 12,
        },
    )
    code, out = run_trainer(tmp_path, spec, nproc=2)
    assert code == 0, out[-4000:]
    keys = storage.s3_list(s3, "out", "run1/")
    assert "run1/COMPLETE" in keys and "run1/adapter/adapter_model.safetensors" in keys
    assert any(k.startswith("run1/checkpoints/step-00000010/") and k.endswith("COMPLETE") for k in keys)
    manifest = json.loads(s3.get_object(Bucket="out", Key="run1/manifest.json")["Body"].read())
    assert "model/model.safetensors" in manifest["files"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "fetched"
    storage.OutputStore("s3://out/run1", StorageSpec(endpoint=s3_endpoint)).get_dir("adapter", local)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)), str(local))


@pytest.mark.slow
def test_missing_s3_dataset_exits_dataset_invalid(s3, s3_endpoint: str, tmp_path: Path) -> None:
    spec = job_spec(
        tmp_path, **{"dataset.train": "s3://data/absent.jsonl", "storage": {"endpoint": s3_endpoint}}
    )
    code, out = run_trainer(tmp_path, spec, nproc=1)
    assert code == ExitCode.DATASET_INVALID, out[-3000:]
    assert "spec.dataset.train" in termination(tmp_path)["message"]
