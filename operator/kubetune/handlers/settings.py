"""Operator settings: one object, from KUBETUNE_* environment variables; `kubetune operator` flags
are passed in as keyword arguments (they win over the environment)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune.render.objects import DEFAULT_IMAGE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", frozen=True, extra="forbid")

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """KUBETUNE_NAMESPACES: comma-separated namespaces to watch; empty watches all (needs the ClusterRole)."""
    trainer_image: str = DEFAULT_IMAGE
    """KUBETUNE_TRAINER_IMAGE: image for FineTuneJobs that set no spec.image."""
    poll_interval: float = Field(default=10.0, gt=0, le=3600)
    """KUBETUNE_POLL_INTERVAL: seconds between reads of each running job's rank-0 progress (the shortest;
    it stretches when the fleet outgrows the progress budget)."""
    progress_budget: float = Field(default=100.0, gt=0)
    """KUBETUNE_PROGRESS_BUDGET: progress reads per second for the whole fleet; with more running jobs than
    budget x pollInterval, each job is read every (running jobs / budget) seconds instead."""
    progress_concurrency: int = Field(default=32, ge=1, le=1024)
    """KUBETUNE_PROGRESS_CONCURRENCY: progress requests in flight at once."""
    progress_timeout: float = Field(default=2.0, gt=0)
    """KUBETUNE_PROGRESS_TIMEOUT: seconds to wait for rank 0's /progress before giving up this round."""
    workers: int = Field(default=8, ge=1, le=256)
    """KUBETUNE_WORKERS: FineTuneJobs reconciled at once (threads making Kubernetes API calls)."""
    api_qps: float = Field(default=100.0, gt=0)
    """KUBETUNE_API_QPS: sustained Kubernetes API requests per second (Kopf's watches are not counted). A new
    job costs about five calls (Job, ConfigMap, Service, status, Event; a suspended one three); a job at rest none."""
    api_burst: int = Field(default=500, ge=1)
    """KUBETUNE_API_BURST: requests allowed at once above api_qps before waiting."""
    log_format: Literal["text", "json"] = "text"
    """KUBETUNE_LOG_FORMAT: text or json."""
    peering: bool = False
    """KUBETUNE_PEERING: Kopf peering (only for more than one replica); off by default (standalone)."""
    liveness: str = "http://0.0.0.0:8080/healthz"
    """KUBETUNE_LIVENESS: Kopf's liveness endpoint, probed by the Deployment."""
    metrics_port: int = Field(default=8000, ge=0, le=65535)
    """KUBETUNE_METRICS_PORT: Prometheus /metrics port (kubetune.handlers.metrics); 0 turns it off."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
