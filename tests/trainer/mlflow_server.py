"""A real MLflow tracking server for the tests: `mlflow server` from pip, SQLite backend store, artifacts
proxied by the server into S3 (moto's S3 server in tests/, MinIO in e2e).

The server lives in its own venv (.ci/mlflow-server-requirements.txt, pinned): full mlflow needs
pyarrow<26 and the trainer's venv pins 26; the trainer itself carries only mlflow-skinny, the client.
The venv is built once per requirements file under ~/.cache/kubetune-mlflow (a file lock keeps parallel
builders apart); `.ci/run` builds it in the background, `python tests/trainer/mlflow_server.py --prepare` by hand.

    with MlflowServer(tmp_path, s3_endpoint) as server:
        client = MlflowClient(server.uri)

With `admin_password` it runs MLflow's basic-auth app (`mlflow server --app-name basic-auth`, the `auth`
extra): every request needs a user and password, the admin is `admin`, `create_user()` adds others.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from trainer_helpers import REPO, S3_CREDENTIALS, free_port

REQUIREMENTS = REPO / ".ci" / "mlflow-server-requirements.txt"


def server_venv() -> Path:
    """The venv with `mlflow server` (built on first use; $KUBETUNE_MLFLOW_VENV points at another)."""
    if given := os.environ.get("KUBETUNE_MLFLOW_VENV"):
        return Path(given)
    key = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    root = Path.home() / ".cache" / "kubetune-mlflow"
    venv = root / f"venv-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".installed").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [
                    str(venv / "bin" / "pip"),
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-r",
                    str(REQUIREMENTS),
                ],
                check=True,
            )
            (venv / ".installed").touch()
    return venv


class MlflowServer:
    """`mlflow server` on loopback; artifacts go through the server (--artifacts-destination) into S3."""

    def __init__(self, workdir: Path, s3_endpoint: str, bucket: str = "mlflow", port: int | None = None,
                 s3_credentials: dict[str, str] | None = None, prefix: str = "artifacts",
                 admin_password: str | None = None):  # fmt: skip
        self.workdir, self.s3_endpoint, self.bucket, self.prefix = workdir, s3_endpoint, bucket, prefix
        self.s3_credentials = {**S3_CREDENTIALS, **(s3_credentials or {})}
        self.admin_password = admin_password
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mlflow-server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        import boto3

        creds = self.s3_credentials
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")  # fmt: skip
        if self.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=self.bucket)
        venv = server_venv()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **creds,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        }
        cmd = [str(venv / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{self.bucket}/{self.prefix}"]  # fmt: skip
        if self.admin_password is not None:
            config = self.workdir / "basic_auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.workdir / 'basic_auth.db'}\n"
                              "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                              # a PBKDF2 check per request (seconds each on a loaded CI machine) unless cached
                              "auth_cache_ttl_seconds = 600\n")  # fmt: skip
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=hashlib.sha256(self.admin_password.encode()).hexdigest())  # fmt: skip
            cmd += ["--app-name", "basic-auth"]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def create_user(self, username: str, password: str) -> None:
        """A user of the basic-auth app (created by the admin); new users may read everything and manage what they create."""
        assert self.admin_password is not None, "create_user needs the basic-auth app (admin_password)"
        token = base64.b64encode(f"admin:{self.admin_password}".encode()).decode()
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/users/create", method="POST",
                                         data=json.dumps({"username": username, "password": password}).encode(),
                                         headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200, resp.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["--prepare"]:
        print(server_venv())
    else:
        sys.exit("usage: python tests/trainer/mlflow_server.py --prepare")
