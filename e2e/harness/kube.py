"""A tiny JSON REST client for the Kubernetes API (stdlib only).

The harness talks to the API server with it (node agent, token requests, waits) so it
does not depend on the kubernetes Python client's version-specific patch semantics.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Credentials:
    server: str
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str | None = None


class Kube:
    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=str(creds.ca_file))
        if creds.cert_file:
            self._ctx.load_cert_chain(str(creds.cert_file), str(creds.key_file))

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        url = self.creds.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.creds.token:
            req.add_header("Authorization", f"Bearer {self.creds.token}")
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace"), method, path) from None
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: str) -> Obj:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Obj, content_type: str = STRATEGIC) -> Obj:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        return self.request("DELETE", path, body)

    def get_or_none(self, path: str) -> Obj | None:
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def wait_for(self, path: str, pred: Any = lambda o: True, timeout: float = 60.0) -> Obj:
        """Poll GET path until it exists and pred(obj) is true."""
        deadline = time.monotonic() + timeout
        last: Obj | None = None
        while time.monotonic() < deadline:
            last = self.get_or_none(path)
            if last is not None and pred(last):
                return last
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout}s waiting for {path}; last: {json.dumps(last)[:2000]}")
