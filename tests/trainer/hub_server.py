"""A Hugging Face hub on loopback, for `hf://` sources: the hub cannot be reached from tests.

It answers the calls `huggingface_hub.snapshot_download` makes, shaped as the hub answers them:
`GET /api/models/<repo>/revision/<rev>` (repo info with its commit sha), `GET
/api/models/<repo>/tree/<rev>` (the file list) and `HEAD`/`GET /<repo>/resolve/<rev>/<file>`
(`X-Repo-Commit`, `ETag`, `Content-Length`), with the hub's 404s and `X-Error-Code` headers
(RepoNotFound, RevisionNotFound, EntryNotFound). Dataset repositories are keyed `datasets/<org>/<name>`
and answer `/api/datasets/...` and `/datasets/<repo>/resolve/...`. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)


@dataclass
class Hub:
    repos: dict[str, Repo]
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Hub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: str, message: str) -> None:
                self._send(404, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "Content-Type": "application/json"})

            def _repo(self, repo_id: str, rev: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error("RepoNotFound", "Repository not found")
                    return None
                if rev not in repo.branches and rev != repo.sha:
                    self._error("RevisionNotFound", f"Invalid rev id: {rev}")
                    return None
                return repo

            def _route(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                if path.startswith(("/api/models/", "/api/datasets/")):
                    datasets = path.startswith("/api/datasets/")
                    rest = path.split("/", 3)[3]
                    kind = "/tree/" if "/tree/" in rest else "/revision/"
                    repo_id, _, rev = rest.partition(kind)
                    repo_id = f"datasets/{repo_id}" if datasets else repo_id
                    repo = self._repo(repo_id, rev.split("/")[0] or "main")  # /api/<kind>/<repo> alone: the default branch
                    if repo is None:
                        return
                    if kind == "/tree/":
                        entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                   for name, data in sorted(repo.files.items())]  # fmt: skip
                        body = json.dumps(entries).encode()
                    else:
                        siblings = [{"rfilename": name} for name in sorted(repo.files)]
                        body = json.dumps({"id": repo_id.removeprefix("datasets/"), "sha": repo.sha, "siblings": siblings}).encode()
                    self._send(200, body, {"Content-Type": "application/json"})
                    return
                parts = path.lstrip("/").split("/")
                if "resolve" in parts:
                    i = parts.index("resolve")
                    repo = self._repo("/".join(parts[:i]), parts[i + 1])
                    if repo is None:
                        return
                    name = "/".join(parts[i + 2 :])
                    if name not in repo.files:
                        self._error("EntryNotFound", f"{name} does not exist")
                        return
                    data = repo.files[name]
                    self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
                    return
                self._send(404)

            do_GET = do_HEAD = _route  # noqa: N815 (http.server's naming)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def repo_from_dir(directory: Path) -> Repo:
    return Repo({p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()})
