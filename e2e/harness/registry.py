"""An OCI registry on loopback for the e2e suite: the CNCF distribution registry (build.sh `registry`).

Plain HTTP on 127.0.0.1 (clients say so: oras-py's `insecure`, the job's `plainHTTP: true`), filesystem
storage under the workdir, and htpasswd auth with one user whose bcrypt entry is written here, so a wrong
password is refused as any real registry refuses it.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import binaries
from .procs import Proc, free_port

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
auth:
  htpasswd:
    realm: kubetune-e2e
    path: {htpasswd}
"""


class Registry:
    def __init__(self, workdir: Path, user: str = "kubetune") -> None:
        self.dir = workdir
        self.user = user
        self.password = secrets.token_hex(12)
        self.port = 0
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        """registry host:port, as it appears in references (`<host>/<repo>:<tag>`)."""
        return f"127.0.0.1:{self.port}"

    def dockerconfigjson(self, password: str | None = None, host: str | None = None) -> str:
        """A kubernetes.io/dockerconfigjson document for this registry (another password to test refusal),
        keyed by `host` (default `.host`; pods that reach the registry through a forwarder name it there)."""
        auth = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
        return json.dumps({"auths": {host or self.host: {"auth": auth}}})

    def secret(
        self, name: str, namespace: str, password: str | None = None, host: str | None = None
    ) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": {".dockerconfigjson": self.dockerconfigjson(password, host)},
        }  # fmt: skip

    def client(self) -> Any:
        """An oras-py client logged in with the right password, over plain HTTP."""
        import oras.provider  # noqa: PLC0415

        client = oras.provider.Registry(hostname=self.host, insecure=True, auth_backend="basic")
        client.auth.set_basic_auth(self.user, self.password)
        return client

    def start(self) -> Registry:
        import bcrypt  # noqa: PLC0415

        registry = binaries.ensure("registry")["registry"]
        self.dir.mkdir(parents=True, exist_ok=True)
        htpasswd = self.dir / "htpasswd"
        htpasswd.write_text(
            f"{self.user}:{bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=6)).decode()}\n"
        )
        self.port = free_port()
        config = self.dir / "config.yml"
        config.write_text(
            CONFIG.format(
                root=self.dir / "data", port=self.port, secret=secrets.token_hex(16), htpasswd=htpasswd
            )
        )
        self.proc = Proc("registry", [str(registry), "serve", str(config)], self.dir / "registry.log")
        self._wait()
        return self

    def _wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            self.proc.check()
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and asking for credentials
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"registry not ready at {self.host}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
