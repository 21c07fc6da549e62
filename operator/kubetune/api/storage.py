"""S3 URIs, the S3 client and file digests: one implementation for the operator's clients (SDK, CLI) and the
trainer. boto3 is imported only when a client is made (the operator image does not need it)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune.api.models import StorageSpec

CHUNK = 1 << 20


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"). The key is taken as written: `#` and `?` are part of an
    S3 key, not a URL fragment or query."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def s3_client(storage: StorageSpec, credentials: Mapping[str, str] | None = None) -> Any:
    """A boto3 S3 client for spec.storage. Keys from `credentials` (AWS_* names) when given, else boto3's own
    chain: the environment (the operator maps the job's Secret to AWS_* env vars), IRSA, a profile. The endpoint
    is spec.storage.endpoint, else $AWS_ENDPOINT_URL."""
    import boto3
    from botocore.config import Config

    creds = credentials or {}
    return boto3.client(
        "s3",
        endpoint_url=storage.endpoint or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=storage.region,
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"),
        config=Config(
            s3={"addressing_style": "path" if storage.path_style else "auto"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def sha256_file(path: Path) -> str:
    """The file's sha256 as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
