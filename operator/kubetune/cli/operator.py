"""`kubetune operator`: run the operator (Kopf) against the current cluster.

Flags override the KUBETUNE_* environment (see kubetune.handlers.settings).
"""

from __future__ import annotations

import argparse
import asyncio
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)")
    where.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (default without -n)")
    parser.add_argument("--trainer-image", help="default trainer image (KUBETUNE_TRAINER_IMAGE)")
    parser.add_argument("--poll-interval", type=float, help="seconds between status reads (KUBETUNE_POLL_INTERVAL)")
    parser.add_argument("--log-format", choices=["text", "json"], help="log format (KUBETUNE_LOG_FORMAT)")
    parser.add_argument("--peering", action="store_true", help="enable Kopf peering (several replicas)")
    parser.add_argument("--liveness", help="liveness endpoint URL (KUBETUNE_LIVENESS), e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (KUBETUNE_METRICS_PORT, default 8000; 0: off)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    env = {
        "KUBETUNE_NAMESPACES": ",".join(args.namespace) if args.namespace else None,
        "KUBETUNE_TRAINER_IMAGE": args.trainer_image,
        "KUBETUNE_POLL_INTERVAL": str(args.poll_interval) if args.poll_interval else None,
        "KUBETUNE_LOG_FORMAT": args.log_format,
        "KUBETUNE_PEERING": "true" if args.peering else None,
        "KUBETUNE_LIVENESS": args.liveness,
        "KUBETUNE_METRICS_PORT": str(args.metrics_port) if args.metrics_port is not None else None,
    }
    if args.all_namespaces:
        env["KUBETUNE_NAMESPACES"] = ""
    for key, value in env.items():
        if value is not None:
            os.environ[key] = value

    import kopf

    from kubetune import operator_main  # registers the handlers with the settings above

    settings = operator_main.SETTINGS
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=not settings.peering,
            liveness_endpoint=settings.liveness or None,
        )
    )
    return 0
