"""Typed errors of the SDK. Each says what went wrong and what to do; `str(err)` is one line.

`SpecInvalid` is the validation function's own error (`kubetune.api.validation`): the same
field messages `kubetune validate` prints, raised before anything reaches a cluster.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubetune.api.validation import Problem, SpecInvalid

__all__ = [
    "AlreadyExists",
    "ApiError",
    "ClientError",
    "Forbidden",
    "JobFailed",
    "NotFound",
    "SpecInvalid",
    "Unauthorized",
    "Unreachable",
    "from_api",
]


class ClientError(Exception):
    """Base of the SDK's errors other than SpecInvalid (a ValueError, as `kubetune validate` raises it)."""


class NotFound(ClientError):
    def __init__(self, kind: str, name: str, namespace: str | None):
        self.kind, self.name, self.namespace = kind, name, namespace
        where = f" in namespace {namespace}" if namespace else ""
        super().__init__(f"{kind} {name!r} not found{where}")


class AlreadyExists(ClientError):
    def __init__(self, kind: str, name: str, namespace: str | None):
        self.kind, self.name, self.namespace = kind, name, namespace
        super().__init__(
            f"{kind} {name!r} already exists in namespace {namespace}; delete it first or pick another name"
        )


class Forbidden(ClientError):
    """RBAC refused a call: `verb` on `resource` is what the caller's Role lacks."""

    def __init__(self, verb: str, resource: str, namespace: str | None, user: str | None = None):
        self.verb, self.resource, self.namespace, self.user = verb, resource, namespace, user
        who = f"{user} " if user else ""
        where = f" in namespace {namespace}" if namespace else ""
        super().__init__(
            f"forbidden: {who}cannot {verb} {resource}{where}; "
            f"ask for a Role granting verb {verb!r} on {resource}"
        )


class Unreachable(ClientError):
    """The API server was never reached (refused, reset, TLS or DNS failure), as kubectl reports it."""

    def __init__(self, host: str, cause: BaseException):
        self.host = host
        reason = getattr(cause, "reason", None) or cause
        detail = str(reason).split(": ", 1)[-1] if ": " in str(reason) else str(reason)
        super().__init__(
            f"cannot connect to the API server at {host} ({detail}): is the cluster up, and the "
            "kubeconfig's server and context the right ones?"
        )


class Unauthorized(ClientError):
    """401: the server does not accept the kubeconfig's credentials."""

    def __init__(self, message: str):
        detail = f": {message}" if message and message.lower() != "unauthorized" else ""
        super().__init__(
            f"you must be logged in to the API server (Unauthorized{detail}); "
            "renew the kubeconfig's credentials or pick another --context"
        )


class ApiError(ClientError):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"API server answered {status}: {message}")


class JobFailed(ClientError):
    """`wait()` saw the job end Failed (or in another phase than the one waited for)."""

    def __init__(self, name: str, phase: str, reason: str | None, message: str | None):
        self.name, self.phase, self.reason, self.message = name, phase, reason, message
        super().__init__(
            f"FineTuneJob {name} ended {phase}"
            + (f" ({reason})" if reason else "")
            + (f": {message}" if message else "")
        )


_CANNOT = re.compile(
    r'User "(?P<user>[^"]+)" cannot (?P<verb>[a-z]+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)


def _status(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes | bytearray):
        body = body.decode(errors="replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return {"message": body}
    return body if isinstance(body, dict) else {}


def from_api(
    status: int, body: Any, *, verb: str, resource: str, name: str | None, namespace: str | None
) -> Exception:
    """The typed error for an API server answer (`body` is its metav1.Status, as bytes, text or dict).

    Forbidden names the verb from the server's message (`User "u" cannot create resource
    "finetunejobs" in API group "kubetune.io"`), falling back to the verb that was attempted.
    """
    st = _status(body)
    message = str(st.get("message") or "")
    kind = resource.split(".")[0].removesuffix("s") if resource else "object"
    if status == 404:
        return NotFound(kind, name or "", namespace)
    if status == 401:
        return Unauthorized(message)
    if status == 409 and verb == "create":
        return AlreadyExists(kind, name or "", namespace)
    if status == 403:
        m = _CANNOT.search(message)
        if m:
            res = m["resource"] + (f".{m['group']}" if m["group"] else "")
            return Forbidden(m["verb"], res, namespace, m["user"])
        return Forbidden(verb, resource, namespace)
    if status == 422:
        causes = ((st.get("details") or {}).get("causes")) or []
        problems = [Problem(str(c.get("field") or "(document)"), str(c.get("message") or "")) for c in causes]
        return SpecInvalid(problems or [Problem("(document)", message)])
    return ApiError(status, message or str(body)[:300])
