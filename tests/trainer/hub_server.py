"""A Hugging Face hub on loopback, for `hf://` sources: the hub cannot be reached from tests.

It answers the calls `huggingface_hub.snapshot_download` makes, shaped as the hub answers them:
`GET /api/models/<repo>/revision/<rev>` (repo info with its commit sha), `GET
/api/models/<repo>/tree/<rev>` (the file list) and `HEAD`/`GET /<repo>/resolve/<rev>/<file>`
(`X-Repo-Commit`, `ETag`, `Content-Length`), with the hub's 404s and `X-Error-Code` headers
(RepoNotFound, RevisionNotFound, EntryNotFound). Dataset repositories are keyed `datasets/<org>/<name>`
and answer `/api/datasets/...` and `/datasets/<repo>/resolve/...`. Every request is recorded.

It also takes what `HfApi.create_repo` and `HfApi.upload_folder` send: `GET /api/whoami-v2`, `POST
/api/repos/create`, `POST /api/validate-yaml` (accepted as sent: the Hub's own metadata rules are not
run here), `POST /api/models/<repo>/preupload/<rev>` (every file answered `regular`, so files travel
inline in the commit: no LFS or Xet transfer) and `POST /api/models/<repo>/commit/<rev>` (the NDJSON
commit: the files replace the repository's, with a new commit sha). With `tokens` set, every write and
whoami need `Authorization: Bearer <one of them>` (401 otherwise).
"""

from __future__ import annotations

import base64
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
    private: bool = False
    commits: list[str] = field(default_factory=list)  # commit messages, oldest first


@dataclass
class Hub:
    repos: dict[str, Repo]
    requests: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)  # non-empty: writes need one of these as a Bearer token
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
                self._send(
                    404,
                    json.dumps({"error": message}).encode(),
                    {"X-Error-Code": code, "Content-Type": "application/json"},
                )

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
                    repo = self._repo(
                        repo_id, rev.split("/")[0] or "main"
                    )  # /api/<kind>/<repo> alone: the default branch
                    if repo is None:
                        return
                    if kind == "/tree/":
                        entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                   for name, data in sorted(repo.files.items())]  # fmt: skip
                        body = json.dumps(entries).encode()
                    else:
                        siblings = [{"rfilename": name} for name in sorted(repo.files)]
                        body = json.dumps(
                            {"id": repo_id.removeprefix("datasets/"), "sha": repo.sha, "siblings": siblings}
                        ).encode()
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
                    self._send(
                        200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                    )
                    return
                self._send(404)

            def _authorized(self) -> bool:
                if not hub.tokens:
                    return True
                given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                if given in hub.tokens:
                    return True
                self._send(
                    401,
                    json.dumps({"error": "Invalid credentials in Authorization header"}).encode(),
                    {"Content-Type": "application/json"},
                )
                return False

            def _json(self, code: int, value: object) -> None:
                self._send(code, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _post(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"POST {path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._authorized():
                    return
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    if repo_id in hub.repos:
                        self._json(
                            409,
                            {
                                "error": "You already created this model repo",
                                "url": f"{hub.endpoint}/{repo_id}",
                            },
                        )
                        return
                    hub.repos[repo_id] = Repo(
                        {}, private=request.get("visibility") == "private" or bool(request.get("private"))
                    )
                    self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                    return
                if path == "/api/validate-yaml":
                    self._json(200, {"errors": [], "warnings": []})
                    return
                if path.startswith("/api/models/") and ("/preupload/" in path or "/commit/" in path):
                    kind = "/preupload/" if "/preupload/" in path else "/commit/"
                    repo_id = path.removeprefix("/api/models/").partition(kind)[0]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        self._error("RepoNotFound", "Repository not found")
                        return
                    if kind == "/preupload/":
                        files = [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in json.loads(body)["files"]
                        ]
                        self._json(200, {"files": files, "commitOid": repo.sha})
                        return
                    message = ""
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            message = item["value"].get("summary", "")
                        elif item["key"] == "file":
                            repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "deletedFile":
                            repo.files.pop(item["value"]["path"], None)
                    repo.commits.append(message)
                    digest = hashlib.sha1()
                    for name, data in sorted(repo.files.items()):
                        digest.update(name.encode() + b"\0" + data)
                    repo.sha = digest.hexdigest()
                    self._json(
                        200,
                        {"commitOid": repo.sha, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{repo.sha}"},
                    )
                    return
                self._send(404)

            def _get(self) -> None:
                if urlparse(self.path).path == "/api/whoami-v2":
                    hub.requests.append("GET /api/whoami-v2")
                    if self._authorized():
                        self._json(
                            200,
                            {
                                "type": "user",
                                "name": "kubetune-test",
                                "auth": {"accessToken": {"role": "write"}},
                            },
                        )
                    return
                self._route()

            do_GET = _get  # noqa: N815 (http.server's naming)
            do_HEAD = _route  # noqa: N815
            do_POST = _post  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def repo_from_dir(directory: Path) -> Repo:
    return Repo(
        {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }
    )
