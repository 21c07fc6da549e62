"""`hf://` model sources against a hub on loopback: fetched once per node, pinned revisions, clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Hub, repo_from_dir
from kubetune.api.contract import ExitCode
from trainer_helpers import TINY_MODEL, job_spec, refused_url, run_trainer, termination


@pytest.fixture
def hub() -> Iterator[Hub]:
    with Hub({"acme/tiny-llama": repo_from_dir(TINY_MODEL)}) as server:
        yield server


def env(tmp: Path, endpoint: str) -> dict[str, str]:
    # HF_HUB_OFFLINE may be set on machines that must not reach the internet; this hub is loopback.
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "KUBETUNE_CACHE_DIR": str(tmp / "cache"),
    }


@pytest.mark.slow
def test_trains_from_the_hub_and_fetches_once_per_node(hub: Hub, tmp_path: Path) -> None:
    spec = job_spec(
        tmp_path, **{"model.source": "hf://acme/tiny-llama", "model.revision": "main", "training.maxSteps": 4}
    )
    code, out = run_trainer(tmp_path, spec, nproc=2, env=env(tmp_path, hub.endpoint))
    assert code == 0, out[-4000:]
    downloads = [r for r in hub.requests if r.startswith("GET /acme/tiny-llama/resolve/")]
    assert len(downloads) == len(hub.repos["acme/tiny-llama"].files), (
        hub.requests
    )  # two ranks, one download each file
    assert (tmp_path / "out" / "COMPLETE").exists() and (
        tmp_path / "out" / "adapter" / "adapter_config.json"
    ).exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "revision", "needle"),
    [
        ("hf://acme/missing", None, "acme/missing"),
        ("hf://acme/tiny-llama", "v9-does-not-exist", "v9-does-not-exist"),
    ],
)
def test_missing_repo_or_revision_is_model_not_found(
    hub: Hub, tmp_path: Path, source: str, revision: str | None, needle: str
) -> None:
    spec = job_spec(tmp_path, **{"model.source": source, "model.revision": revision})
    code, out = run_trainer(tmp_path, spec, nproc=1, env=env(tmp_path, hub.endpoint))
    message = termination(tmp_path)
    assert code == ExitCode.MODEL_NOT_FOUND and message["reason"] == "ModelNotFound", out[-3000:]
    assert "spec.model.source" in message["message"] and needle in message["message"]


def test_unreachable_hub_is_retryable(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, **{"model.source": "hf://acme/tiny-llama"})
    with refused_url() as url:
        code, out = run_trainer(tmp_path, spec, nproc=1, env=env(tmp_path, url))
    message = termination(tmp_path)
    assert code == ExitCode.STORAGE_UNAVAILABLE and message["reason"] == "StorageUnavailable", out[-3000:]
    assert "hf://acme/tiny-llama" in message["message"]
