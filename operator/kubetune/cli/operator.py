"""`kubetune operator`: run the operator (Kopf) against the current cluster.

Flags override the KUBETUNE_* environment (see kubetune.controller.settings); they are handed to the
operator as a Settings object, not through the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

# Seconds to wait for the API server's /version before giving up at start.
REACH_TIMEOUT = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)"
    )
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces (default without -n)"
    )
    parser.add_argument("--trainer-image", help="default trainer image (KUBETUNE_TRAINER_IMAGE)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between progress reads of a running job (KUBETUNE_POLL_INTERVAL)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="log format (KUBETUNE_LOG_FORMAT)")
    parser.add_argument(
        "--peering",
        action="store_true",
        help="enable Kopf peering (KUBETUNE_PEERING; not for replicas: see --leader-elect)",
    )
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="one of several replicas: reconcile only while holding the Lease (KUBETUNE_LEADER_ELECT)",
    )
    parser.add_argument(
        "--liveness", help="liveness endpoint URL (KUBETUNE_LIVENESS), e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port (KUBETUNE_METRICS_PORT, default 8000; 0: off)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def settings_from(args: argparse.Namespace) -> Any:
    """Settings: the environment, overridden by the flags that were given."""
    from kubetune.controller.settings import Settings

    given: dict[str, Any] = {
        "namespaces": args.namespace or None,
        "trainer_image": args.trainer_image,
        "poll_interval": args.poll_interval,
        "log_format": args.log_format,
        "peering": True if args.peering else None,
        "leader_elect": True if args.leader_elect else None,
        "liveness": args.liveness,
        "metrics_port": args.metrics_port,
    }
    if args.all_namespaces:
        given["namespaces"] = []
    return Settings(**{k: v for k, v in given.items() if v is not None})


def cannot_start() -> str | None:
    """Why the operator cannot start, in one line (no kubeconfig, an API server it cannot reach or one that
    refuses its credentials), or None. Checked once before Kopf starts, as controller-runtime's managers do:
    exit 1 (a pod restarts with backoff) rather than a retry loop of tracebacks."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    from kubetune.client.cluster import connect
    from kubetune.client.errors import ClientError, Unreachable, from_api

    try:
        api, _ = connect()
    except ClientError as exc:
        return str(exc)
    try:
        client.VersionApi(api).get_code(_request_timeout=REACH_TIMEOUT)
    except ApiException as exc:
        if exc.status == 401:
            return str(from_api(401, exc.body, verb="get", resource="version", name=None, namespace=None))
    except HTTPError as exc:
        return str(Unreachable(api.configuration.host, exc))
    finally:
        api.close()
    return None


def run(args: argparse.Namespace) -> int:
    import kopf
    from pydantic import ValidationError

    from kubetune import operator_main  # registers the handlers

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        print(
            f"kubetune operator: KUBETUNE_{field.upper()} (--{field.replace('_', '-')}): {err['msg']}; fix the flag or variable"
        )
        return 2
    if (problem := cannot_start()) is not None:
        print(f"kubetune operator: {problem}", file=sys.stderr)
        return 1
    operator_main.use(settings)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )
    elector = stand_by(settings) if settings.leader_elect else None
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not settings.namespaces,
                namespaces=settings.namespaces,
                standalone=not settings.peering,
                liveness_endpoint=settings.liveness or None,
            )
        )
    finally:
        if elector is not None:
            elector.release()  # after Kopf has stopped reconciling: a standby takes over at once
    return 0


def stand_by(settings: Any) -> Any:
    """Block until this replica holds the leader Lease (kubetune.controller.leader); metrics are served meanwhile."""
    from kubetune.controller import kube, leader
    from kubetune.controller.metrics import serve

    kube.load_config()
    if settings.metrics_port:
        serve(settings.metrics_port)
    return leader.lead(settings)
