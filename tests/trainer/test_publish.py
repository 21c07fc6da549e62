"""The OCI artifact the trainer pushes (kubetune_trainer.publish): ModelPack media types, digests, credentials.

Pushing to a real registry is tested end to end in e2e/suite/test_oci_publish.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from kubetune.api.contract import ExitCode
from kubetune_trainer import publish
from kubetune_trainer.checkpoint import file_table
from kubetune_trainer.errors import TrainerError

TINY = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny-llama"


def tiny_layers() -> list[publish.Layer]:
    files = {f"model/{rel}": entry for rel, entry in file_table(TINY).items()}
    return [
        publish.Layer(TINY / layer.rel, layer.rel, layer.sha256, layer.size)
        for layer in publish.layers(TINY, files, "model")
    ]


def test_each_file_is_one_raw_layer_whose_digest_is_the_files_sha256():
    parts = tiny_layers()
    body = publish.manifest(parts, b"{}")
    assert body["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert body["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    by_name = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in body["layers"]}
    assert set(by_name) == {p.name for p in TINY.iterdir() if p.is_file()}
    for name, layer in by_name.items():
        data = (TINY / name).read_bytes()
        assert layer["digest"] == "sha256:" + hashlib.sha256(data).hexdigest() and layer["size"] == len(data)
        assert layer["annotations"]["org.opencontainers.image.title"] == name
    assert by_name["model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert by_name["tokenizer.json"]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"


def test_the_model_config_names_the_layers_and_reads_the_family_from_config_json():
    parts = tiny_layers()
    config = publish.model_config(parts, "tiny")
    assert config["modelfs"] == {"type": "layers", "diffIds": [f"sha256:{p.sha256}" for p in parts]}
    assert config["descriptor"] == {
        "name": "tiny",
        "family": json.loads((TINY / "config.json").read_text())["model_type"],
    }
    assert config["config"]["format"] == "safetensors"


def test_the_same_files_give_the_same_manifest():
    blob = json.dumps(publish.model_config(tiny_layers(), "tiny"), sort_keys=True).encode()
    assert publish.manifest(tiny_layers(), blob) == publish.manifest(tiny_layers(), blob)
    assert "annotations" not in publish.manifest(tiny_layers(), blob)  # no creation time: re-pushes match


def docker_config(tmp_path: Path, auths: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


@pytest.mark.parametrize("server", ["127.0.0.1:5000", "https://127.0.0.1:5000", "http://127.0.0.1:5000/v2/"])
def test_credentials_are_found_by_registry_host(tmp_path, server):
    auth = base64.b64encode(b"kt:s3cret:with-colon").decode()
    path = docker_config(tmp_path, {"ghcr.io": {"auth": "eDp5"}, server: {"auth": auth}})
    assert publish.registry_credentials(path, "127.0.0.1:5000", "regcred") == ("kt", "s3cret:with-colon")


def test_username_and_password_fields_work_too(tmp_path):
    path = docker_config(tmp_path, {"ghcr.io": {"username": "u", "password": "p"}})
    assert publish.registry_credentials(path, "ghcr.io", "regcred") == ("u", "p")


def test_a_secret_without_an_entry_for_the_registry_names_the_secret_and_the_fix(tmp_path):
    path = docker_config(tmp_path, {"ghcr.io": {"auth": "eDp5"}})
    with pytest.raises(TrainerError) as caught:
        publish.registry_credentials(path, "127.0.0.1:5000", "regcred")
    assert caught.value.exit_code == ExitCode.CREDENTIALS_INVALID
    assert "credentialsSecret 'regcred' has no auths entry for 127.0.0.1:5000" in caught.value.message
    assert "eDp5" not in caught.value.message


def test_the_reference_splits_into_registry_repository_and_tag():
    assert publish.split_reference("127.0.0.1:5000/models/tiny:v1") == ("127.0.0.1:5000", "models/tiny", "v1")


def test_the_model_card_joins_as_doc_layers_unless_the_directory_has_a_file_of_that_name(tmp_path):
    (tmp_path / "README.md").write_text("# card")
    (tmp_path / "loss.png").write_bytes(b"png")
    files = file_table(tmp_path)
    model = [publish.Layer(tmp_path / "w.safetensors", "w.safetensors", "00", 1)]
    parts = publish.with_card(model, tmp_path, files, ["README.md", "loss.png", "eval.png"])
    assert [(p.rel, publish.media_type(p.rel)) for p in parts] == [
        ("w.safetensors", "application/vnd.cncf.model.weight.v1.raw"),
        ("README.md", "application/vnd.cncf.model.doc.v1.raw"),
        ("loss.png", "application/vnd.cncf.model.doc.v1.raw"),
    ]
    assert parts[1].sha256 == hashlib.sha256(b"# card").hexdigest()
    peft_readme = [publish.Layer(tmp_path / "a" / "README.md", "README.md", "11", 2)]
    assert [p.sha256 for p in publish.with_card(peft_readme, tmp_path, files, ["README.md"])] == ["11"]
