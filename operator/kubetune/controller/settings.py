"""Operator settings: one object, from KUBETUNE_* environment variables; `kubetune operator` flags
are passed in as keyword arguments (they win over the environment)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune.api.names import DEFAULT_IMAGE
from kubetune.status.usage import PriceTable

JITTER = 1.2
"""client-go's leader election JitterFactor: the retry period times this must fit in the renew deadline."""


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
    """KUBETUNE_PEERING: Kopf peering; off by default (standalone). Not a way to run two replicas: Kopf
    peers of equal priority all freeze. Use leader_elect for that."""
    leader_elect: bool = False
    """KUBETUNE_LEADER_ELECT: run as one of several replicas; only the holder of a coordination.k8s.io
    Lease reconciles, the others stand by (kubetune.controller.leader). Off: this process always reconciles."""
    leader_elect_namespace: str = ""
    """KUBETUNE_LEADER_ELECT_NAMESPACE: namespace of the Lease; empty: the pod's own (its service account's),
    or "default" outside a cluster."""
    leader_elect_lease_name: str = Field(
        default="kubetune-operator", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
    )
    """KUBETUNE_LEADER_ELECT_LEASE_NAME: the Lease's name; replicas that share it elect one leader."""
    leader_elect_lease_duration: float = Field(default=15.0, ge=1, le=3600)
    """KUBETUNE_LEADER_ELECT_LEASE_DURATION: seconds a standby waits after the lease last changed before it
    takes over from a leader that stopped renewing (a crashed or partitioned one)."""
    leader_elect_renew_deadline: float = Field(default=10.0, ge=1, le=3600)
    """KUBETUNE_LEADER_ELECT_RENEW_DEADLINE: seconds a leader keeps trying to renew before it gives up and
    exits; shorter than the lease duration, so it has stopped before anyone else may start."""
    leader_elect_retry_period: float = Field(default=2.0, ge=0.2, le=600)
    """KUBETUNE_LEADER_ELECT_RETRY_PERIOD: seconds between renewals by the leader and attempts by a standby."""
    liveness: str = "http://0.0.0.0:8080/healthz"
    """KUBETUNE_LIVENESS: Kopf's liveness endpoint, probed by the Deployment."""
    metrics_port: int = Field(default=8000, ge=0, le=65535)
    """KUBETUNE_METRICS_PORT: Prometheus /metrics port (kubetune.controller.metrics); 0 turns it off."""
    prices: PriceTable | None = None
    """KUBETUNE_PRICES: the price table as JSON ({"currency", "gpu": {resource: per GPU-hour}, "nodeLabel",
    "node": {label value: per node-hour}}; chart value `prices`): status.usage gets an estimated cost."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("leader_elect_renew_deadline")
    @classmethod
    def _renew_within_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("leader_elect_lease_duration")
        if lease is not None and value >= lease:
            raise ValueError(
                f"must be shorter than the lease duration ({lease:g} s), or two replicas could both lead"
            )
        return value

    @field_validator("leader_elect_retry_period")
    @classmethod
    def _retry_within_renew(cls, value: float, info: ValidationInfo) -> float:
        renew = info.data.get("leader_elect_renew_deadline")
        if renew is not None and value * JITTER >= renew:
            raise ValueError(
                f"must be under the renew deadline / {JITTER} ({renew / JITTER:.3g} s), to retry before giving up"
            )
        return value

    @field_validator("leader_elect")
    @classmethod
    def _not_with_peering(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("peering"):
            raise ValueError("cannot be combined with Kopf peering (KUBETUNE_PEERING); turn peering off")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
