"""Fixtures for the trainer tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from trainer_helpers import TINY_MODEL, moto_s3


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback for one test module, with test credentials in the environment."""
    with moto_s3() as endpoint:
        yield endpoint
