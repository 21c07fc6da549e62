"""Operator settings: one object, read from KUBETUNE_* environment variables (flags set them too)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kubetune.render.objects import DEFAULT_IMAGE


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class Settings:
    namespaces: list[str] = field(default_factory=list)
    """KUBETUNE_NAMESPACES: comma-separated namespaces to watch; empty watches all (needs the ClusterRole)."""
    trainer_image: str = DEFAULT_IMAGE
    """KUBETUNE_TRAINER_IMAGE: image for FineTuneJobs that set no spec.image."""
    poll_interval: float = 10.0
    """KUBETUNE_POLL_INTERVAL: seconds between status reads of each job (Job, pods, rank-0 progress)."""
    progress_timeout: float = 2.0
    """KUBETUNE_PROGRESS_TIMEOUT: seconds to wait for rank 0's /progress before giving up this tick."""
    log_format: str = "text"
    """KUBETUNE_LOG_FORMAT: text or json."""
    peering: bool = False
    """KUBETUNE_PEERING: Kopf peering (only for more than one replica); off by default (standalone)."""
    liveness: str = "http://0.0.0.0:8080/healthz"
    """KUBETUNE_LIVENESS: Kopf's liveness endpoint, probed by the Deployment."""
    metrics_port: int = 8000
    """KUBETUNE_METRICS_PORT: Prometheus /metrics port (kubetune.handlers.metrics); 0 turns it off."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        return cls(
            namespaces=_list(e.get("KUBETUNE_NAMESPACES", "")),
            trainer_image=e.get("KUBETUNE_TRAINER_IMAGE") or DEFAULT_IMAGE,
            poll_interval=float(e.get("KUBETUNE_POLL_INTERVAL") or 10.0),
            progress_timeout=float(e.get("KUBETUNE_PROGRESS_TIMEOUT") or 2.0),
            log_format=(e.get("KUBETUNE_LOG_FORMAT") or "text").lower(),
            peering=(e.get("KUBETUNE_PEERING") or "").lower() in ("1", "true", "yes", "on"),
            liveness=e.get("KUBETUNE_LIVENESS") or "http://0.0.0.0:8080/healthz",
            metrics_port=int(e.get("KUBETUNE_METRICS_PORT") or 8000),
        )
