"""An S3-compatible server on loopback for the e2e suite.

MinIO (built from its Go module by build.sh) is the default: a real server that
checks SigV4 signatures and refuses unknown keys and wrong secrets. moto's server
mode is a fallback only (KUBETUNE_E2E_S3=moto, or when MinIO is unavailable and
KUBETUNE_E2E_BUILD=0): it accepts any credentials, so credential tests skip on it.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import binaries
from .procs import Proc, free_port

REGION = "us-east-1"


class S3Server:
    def __init__(self, workdir: Path, bucket: str = "kubetune-e2e", kind: str | None = None) -> None:
        self.dir = workdir
        self.bucket = bucket
        self.kind = kind or os.environ.get("KUBETUNE_E2E_S3", "minio")
        self.access_key = "kubetune-e2e"
        self.secret_key = secrets.token_hex(16)
        self.region = REGION
        self.port = 0
        self.proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def enforces_credentials(self) -> bool:
        return self.kind == "minio"

    def env(self) -> dict[str, str]:
        """AWS_* variables a client (operator, trainer, tests) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        import boto3  # noqa: PLC0415
        from botocore.config import Config  # noqa: PLC0415

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def start(self) -> S3Server:
        self.port = free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "minio":
            minio = binaries.ensure("minio")["minio"]
            env = {
                **os.environ,
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
                "MINIO_REGION": self.region,
            }
            self.proc = Proc(
                "minio",
                [
                    str(minio),
                    "server",
                    str(self.dir / "data"),
                    "--address",
                    f"127.0.0.1:{self.port}",
                    "--console-address",
                    f"127.0.0.1:{free_port()}",
                    "--quiet",
                ],
                self.dir / "minio.log",
                env,
            )
            self._wait(f"{self.endpoint}/minio/health/ready")
        elif self.kind == "moto":
            moto = Path(sys.executable).parent / "moto_server"
            self.proc = Proc(
                "moto", [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], self.dir / "moto.log"
            )
            self._wait(f"{self.endpoint}/moto-api/")
        else:
            raise ValueError(f"unknown S3 server kind {self.kind!r}")
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _wait(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            self.proc.check()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"{self.kind} not ready at {url}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
