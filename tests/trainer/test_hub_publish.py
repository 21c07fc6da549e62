"""spec.output.publish.huggingface through huggingface_hub's HfApi, against the tests' Hub-API server on loopback
(tests/trainer/hub_server.py: files travel inline in the commit; no LFS or Xet, no Hub-side metadata rules)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Hub
from kubetune.api.contract import ExitCode
from kubetune.api.models import HuggingFacePublish
from kubetune.api.storage import sha256_file
from kubetune_trainer import hub_publish
from kubetune_trainer.errors import TrainerError
from trainer_helpers import TINY_MODEL, job_spec, run_trainer, termination

TOKEN = "hf_write_4c1d8e-never-shown"


@pytest.fixture
def hub() -> Iterator[Hub]:
    with Hub({}, tokens={TOKEN}) as server:
        yield server


def spec_for(hub: Hub, repo: str = "acme/tiny-digits") -> HuggingFacePublish:
    return HuggingFacePublish(repo=repo, token_secret="hf-write", endpoint=hub.endpoint)


def test_a_refused_token_is_one_line_naming_the_secret(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(TrainerError) as err:
        hub_publish.check_access(spec_for(hub))
    assert err.value.exit_code == ExitCode.CREDENTIALS_INVALID
    assert "Secret 'hf-write'" in err.value.message and "hf_wrong" not in err.value.message
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_publish.check_access(spec_for(hub))  # the right one passes


def test_no_token_at_all_names_the_secret_and_key(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(TrainerError, match="the Secret 'hf-write' needs the key HF_TOKEN"):
        hub_publish.check_access(spec_for(hub))


def test_a_push_commits_the_model_with_the_kubetune_card_on_top(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\ntags:\n- kubetune\n---\n\n# tiny\n")
    url = hub_publish.push(spec_for(hub), TINY_MODEL, [card], "kubetune: ml/tiny step 30")
    repo = hub.repos["acme/tiny-digits"]
    assert (
        url == f"{hub.endpoint}/acme/tiny-digits/tree/{repo.sha}"
        and repo.private
        and repo.commits == ["kubetune: ml/tiny step 30"]
    )
    back = Path(
        snapshot_download(
            "acme/tiny-digits", endpoint=hub.endpoint, token=TOKEN, local_dir=str(tmp_path / "back")
        )
    )
    for f in TINY_MODEL.iterdir():
        if f.name != "README.md":
            assert sha256_file(back / f.name) == sha256_file(f), f.name
    assert (back / "README.md").read_text() == card.read_text()


@pytest.mark.slow
def test_a_job_pushes_its_model_and_card_and_reports_the_commit(tmp_path: Path, hub: Hub) -> None:
    publish = {
        "huggingface": {
            "repo": "acme/spell-digits-lora",
            "tokenSecret": "hf-write",
            "endpoint": hub.endpoint,
        }
    }
    spec = job_spec(
        tmp_path,
        **{"training.maxSteps": 6, "output.publish": publish, "output.card": {"license": "apache-2.0"}},
    )
    code, out = run_trainer(tmp_path, spec, nproc=2, env={"HF_TOKEN": TOKEN})
    assert code == 0, out[-4000:]
    repo = hub.repos["acme/spell-digits-lora"]
    pushed = termination(tmp_path)["artifacts"]["huggingface"]
    assert pushed == f"{hub.endpoint}/acme/spell-digits-lora/tree/{repo.sha}"
    assert {"model.safetensors", "config.json", "README.md", "loss.png"} <= set(repo.files)
    assert (
        repo.files["README.md"].decode().startswith("---\n")
        and b"license: apache-2.0" in repo.files["README.md"]
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert repo.files["model.safetensors"] == (tmp_path / "out" / "model" / "model.safetensors").read_bytes()
    assert "model/model.safetensors" in manifest["files"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["huggingface"] == pushed
    assert TOKEN not in out
