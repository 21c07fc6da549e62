"""The operator's only I/O with the Kubernetes API (and rank 0's progress endpoint).

Thin wrappers over the official client that speak plain dicts, treat 404 as
"absent" and 409 on create as "already there" (so a restarted operator never
duplicates a workload).
"""

from __future__ import annotations

import json
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.handlers.metrics import counting_client
from kubetune.render.objects import LABEL_JOB, LABEL_RESTART


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _bearer_token_compat()


def _bearer_token_compat() -> None:
    """kubernetes-client 36 reads the token from `api_key["BearerToken"]`, but its own config
    loaders (kube config and in-cluster) still store it under `api_key["authorization"]`: every
    call went out anonymous (403 for `system:anonymous`), found by the e2e suite running the
    operator under a ServiceAccount token. Mirror the key, also after each token refresh.
    Called before each API object is made: Kopf's login handler reloads the default config."""
    cfg = client.Configuration.get_default_copy()
    token = cfg.api_key.get("authorization")
    if not token or "BearerToken" in cfg.api_key:
        return
    cfg.api_key["BearerToken"] = token
    refresh = cfg.refresh_api_key_hook

    def _refresh(c: Any) -> None:
        if refresh is not None:
            refresh(c)
        if c.api_key.get("authorization"):
            c.api_key["BearerToken"] = c.api_key["authorization"]

    cfg.refresh_api_key_hook = _refresh
    client.Configuration.set_default(cfg)


def _api(cls: Any) -> Any:
    _bearer_token_compat()
    return cls(counting_client())  # every request counted in kubetune_api_requests_total


def _data(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)  # type: ignore[no-any-return]


def _temporary(exc: ApiException, what: str) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"{what}: {exc.status} {exc.reason}", delay=10)


def create_if_absent(obj: dict[str, Any]) -> bool:
    """Create `obj`; False when it already existed. Refused objects are permanent errors."""
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    try:
        if kind == "ConfigMap":
            _api(client.CoreV1Api).create_namespaced_config_map(ns, obj)
        elif kind == "Service":
            _api(client.CoreV1Api).create_namespaced_service(ns, obj)
        elif kind == "Job":
            _api(client.BatchV1Api).create_namespaced_job(ns, obj)
        else:
            raise ValueError(kind)
    except ApiException as exc:
        if exc.status == 409:
            return False
        if exc.status in (400, 422):
            raise kopf.PermanentError(f"{kind} {obj['metadata']['name']} refused by the API server: {exc.body}") from exc
        raise _temporary(exc, f"create {kind} {obj['metadata']['name']}") from exc
    return True


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _data(_api(client.BatchV1Api).read_namespaced_job(name, namespace, _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _temporary(exc, f"read Job {name}") from exc


def _list_of(ftj: str, namespace: str, list_call: Any, what: str) -> list[dict[str, Any]]:
    """The objects of one FineTuneJob (by its label), as plain dicts."""
    try:
        resp = list_call(namespace, label_selector=f"{LABEL_JOB}={ftj}", _preload_content=False)
    except ApiException as exc:
        raise _temporary(exc, f"list {what}") from exc
    return list(_data(resp).get("items") or [])


def list_jobs(namespace: str, ftj: str) -> list[dict[str, Any]]:
    return _list_of(ftj, namespace, _api(client.BatchV1Api).list_namespaced_job, "Jobs")


def list_pods(namespace: str, ftj: str) -> list[dict[str, Any]]:
    return _list_of(ftj, namespace, _api(client.CoreV1Api).list_namespaced_pod, "Pods")


def generation_of(obj: dict[str, Any]) -> str:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_RESTART, "")


def delete_job(namespace: str, name: str, propagation: str = "Foreground") -> None:
    """Delete a workload Job and (Foreground) its pods before the Job itself goes."""
    try:
        _api(client.BatchV1Api).delete_namespaced_job(
            name, namespace, body=client.V1DeleteOptions(propagation_policy=propagation)
        )
    except ApiException as exc:
        if exc.status != 404:
            raise _temporary(exc, f"delete Job {name}") from exc


def set_job_suspend(namespace: str, name: str, suspend: bool) -> bool:
    """Patch the workload Job's spec.suspend; False when there is no such Job yet."""
    try:
        _api(client.BatchV1Api).patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise _temporary(exc, f"patch Job {name}") from exc
    return True


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    try:
        _api(client.CustomObjectsApi).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise _temporary(exc, f"patch status of {name}") from exc


def delete_finetunejob(namespace: str, name: str) -> None:
    try:
        _api(client.CustomObjectsApi).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Background")
        )
    except ApiException as exc:
        if exc.status != 404:
            raise _temporary(exc, f"delete FineTuneJob {name}") from exc
