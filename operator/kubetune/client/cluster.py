"""The cluster backend: FineTuneJobs through the Kubernetes API (kubeconfig, context, or in-cluster).

Follows kubectl: `KUBECONFIG` (or ~/.kube/config), an optional context, and the context's
namespace unless one is given. Every API refusal becomes a typed error (errors.from_api).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.models import GROUP, PLURAL, VERSION, FineTuneJob
from kubetune.client import jobs
from kubetune.client.errors import ClientError, NotFound, Unreachable, from_api
from kubetune.client.jobs import Events, JobList

RESOURCE = f"{PLURAL}.{GROUP}"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
T = TypeVar("T")


def _token_compat(cfg: Any) -> None:
    """kubernetes-client 36 reads tokens from api_key["BearerToken"] but its loaders store "authorization"."""
    token = cfg.api_key.get("authorization")
    if token and "BearerToken" not in cfg.api_key:
        cfg.api_key["BearerToken"] = token


def connect(kubeconfig: str | None = None, context: str | None = None) -> tuple[Any, str]:
    """(ApiClient, default namespace) as kubectl would pick them."""
    from kubernetes import client, config

    try:
        return _connect(client, config, kubeconfig, context)
    except (config.ConfigException, OSError) as exc:
        raise ClientError(
            f"no cluster to talk to: {exc} (set KUBECONFIG, --kubeconfig or --context)"
        ) from None


def _connect(client: Any, config: Any, kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if path or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        shown = path or "~/.kube/config"
        if not Path(os.path.expanduser(shown)).is_file():
            raise ClientError(
                f"no kubeconfig at {shown}: set KUBECONFIG or --kubeconfig (kubectl reads the same file)"
            )
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=path)
            if context not in [c["name"] for c in contexts]:
                raise ClientError(f'context "{context}" does not exist in {shown}')
        cfg = client.Configuration()
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        _, active = config.list_kube_config_contexts(config_file=path)
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=path)
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
    else:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else "default"
    _token_compat(cfg)
    return client.ApiClient(cfg), namespace


class ClusterBackend:
    def __init__(
        self,
        namespace: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        api_client: Any = None,
    ):
        from kubernetes import client

        if api_client is None:
            api_client, default_ns = connect(kubeconfig, context)
        else:
            default_ns = "default"
        self.api_client = api_client
        self.namespace = namespace or default_ns
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    # ---------------------------------------------------------------- plumbing

    def _call(self, verb: str, resource: str, name: str | None, fn: Callable[[], T]) -> T:
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except ApiException as exc:
            raise from_api(
                exc.status or 0, exc.body, verb=verb, resource=resource, name=name, namespace=self.namespace
            ) from None
        except HTTPError as exc:  # refused, reset, TLS, DNS: the API server was never reached
            raise Unreachable(self.api_client.configuration.host, exc) from None

    def _list_call(
        self, label_selector: str | None, all_namespaces: bool
    ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """The list function and its arguments: one namespace, or every one (kubectl's -A)."""
        kw = {"label_selector": label_selector} if label_selector else {}
        if all_namespaces:
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL), kw
        return self.custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL), kw

    def _get_raw(self, name: str) -> dict[str, Any]:
        return self._call(
            "get",
            RESOURCE,
            name,
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name),
        )

    # ---------------------------------------------------------------- the API

    def submit(self, doc: dict[str, Any]) -> FineTuneJob:
        doc["metadata"]["namespace"] = self.namespace
        name = doc["metadata"].get("name")
        obj = self._call(
            "create",
            RESOURCE,
            name,
            lambda: self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, doc),
        )
        return jobs.from_object(obj)

    def get(self, name: str) -> FineTuneJob:
        return jobs.from_object(self._get_raw(name))

    def list(self, label_selector: str | None = None, all_namespaces: bool = False) -> JobList:
        fn, pos, kw = self._list_call(label_selector, all_namespaces)
        resp = self._call("list", RESOURCE, None, lambda: fn(*pos, **kw))
        return [jobs.from_object(o) for o in resp.get("items") or []]

    def watch(
        self,
        name: str | None = None,
        timeout: float | None = None,
        label_selector: str | None = None,
        all_namespaces: bool = False,
    ) -> Iterator[tuple[str, FineTuneJob]]:
        """(event type, job) for the current state, then every change, from a watch (no polling).
        Re-opens the watch when the server closes it; re-lists when the resourceVersion is too old."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        deadline = None if timeout is None else time.monotonic() + timeout
        list_fn, pos, selector = self._list_call(label_selector, all_namespaces and not name)
        if name:
            selector["field_selector"] = f"metadata.name={name}"
        while True:
            if name:
                first = self._get_raw(name)
                items, rv = [first], first["metadata"]["resourceVersion"]
            else:
                resp = self._call("list", RESOURCE, None, lambda: list_fn(*pos, **selector))
                items, rv = resp.get("items") or [], resp["metadata"]["resourceVersion"]
            for obj in items:
                yield "ADDED", jobs.from_object(obj)
            gone = False
            while not gone:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                w = watch.Watch()
                try:
                    for event in w.stream(
                        list_fn,
                        *pos,
                        resource_version=rv,
                        allow_watch_bookmarks=True,
                        timeout_seconds=int(min(left or 300, 300)) or 1,
                        **selector,
                    ):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            gone = (obj or {}).get("code") == 410
                            break
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            yield event["type"], jobs.from_object(obj)
                except ApiException as exc:
                    if exc.status == 410:
                        gone = True
                    else:
                        raise from_api(
                            exc.status or 0,
                            exc.body,
                            verb="watch",
                            resource=RESOURCE,
                            name=name,
                            namespace=self.namespace,
                        ) from None
                except HTTPError as exc:
                    raise Unreachable(self.api_client.configuration.host, exc) from None
                finally:
                    w.stop()

    def set_suspend(self, name: str, suspend: bool) -> FineTuneJob:
        body = {"spec": {"runPolicy": {"suspend": suspend}}}
        obj = self._call(
            "patch",
            RESOURCE,
            name,
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, body
            ),
        )
        return jobs.from_object(obj)

    def delete(self, name: str) -> None:
        from kubernetes import client

        self._call(
            "delete",
            RESOURCE,
            name,
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            ),
        )

    def events(self, name: str) -> Events:
        sel = f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        resp = self._call(
            "list",
            "events",
            None,
            lambda: self.core.list_namespaced_event(
                self.namespace, field_selector=sel, _preload_content=False
            ),
        )
        import json

        items = json.loads(resp.data).get("items") or []
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    # ---------------------------------------------------------------- pods

    def rank_pod(self, name: str, rank: int, wait: float = 0.0) -> str:
        """The current gang's pod of node rank `rank` (its completion index)."""
        from kubetune.api.names import COMPLETION_INDEX, LABEL_JOB, LABEL_RESTART

        deadline = time.monotonic() + wait
        while True:
            job = self.get(name)
            restarts = job.status.restarts if job.status else 0
            selector = f"{LABEL_JOB}={name},{LABEL_RESTART}={restarts}"
            resp = self._call(
                "list",
                "pods",
                None,
                lambda s=selector: self.core.list_namespaced_pod(  # type: ignore[misc]
                    self.namespace, label_selector=s
                ),
            )
            for pod in resp.items:
                if (pod.metadata.annotations or {}).get(COMPLETION_INDEX) == str(rank):
                    return str(pod.metadata.name)
            if time.monotonic() >= deadline:
                raise NotFound("pod", f"{name} rank {rank}", self.namespace)
            time.sleep(1.0)

    def _wait_started(self, pod: str, container: str, wait: float) -> None:
        """Until the container has started (or ended): the kubelet refuses the log of a container still
        being created (400 "waiting to start"), which a follow right after submit would otherwise meet."""
        deadline = time.monotonic() + wait
        while True:
            got = self._call("get", "pods", pod, lambda: self.core.read_namespaced_pod(pod, self.namespace))
            states = [s.state for s in got.status.container_statuses or [] if s.name == container]
            if got.status.phase in ("Succeeded", "Failed") or (
                states and (states[0].running or states[0].terminated)
            ):
                return
            if time.monotonic() >= deadline:
                return  # let the log request say why
            time.sleep(1.0)

    def logs(self, name: str, rank: int = 0, follow: bool = True, tail: int | None = None) -> Iterator[str]:
        from kubetune.api.names import CONTAINER

        pod = self.rank_pod(name, rank, wait=60.0 if follow else 0.0)
        if follow:
            self._wait_started(pod, CONTAINER, 120.0)
        kw: dict[str, Any] = {"container": CONTAINER, "follow": follow, "_preload_content": False}
        if tail is not None:
            kw["tail_lines"] = tail
        resp = self._call(
            "get", "pods/log", pod, lambda: self.core.read_namespaced_pod_log(pod, self.namespace, **kw)
        )
        buf = b""
        for chunk in resp.stream(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if buf:
            yield buf.decode(errors="replace")

    def secret_data(self, name: str) -> dict[str, str]:
        secret = self._call(
            "get", "secrets", name, lambda: self.core.read_namespaced_secret(name, self.namespace)
        )
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
