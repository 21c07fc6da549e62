"""The trainer's config contract: rendered by the operator (and `kubetune run`), read by the trainer.

One typed object travels from the control side to every rank: the FineTuneJob's
spec with all defaults applied, plus what the control side resolved (world size,
gradient accumulation, where progress is served). The operator writes it as YAML
into the job's ConfigMap; the trainer loads it with `TrainerConfig.load()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import yaml
from pydantic import Field

from kubetune.api.models import ApiModel, FineTuneJobSpec

TRAINER_CONFIG_VERSION: Final = "kubetune.io/trainer-config/v1"
DEFAULT_PROGRESS_PORT = 8080
DEFAULT_RDZV_PORT = 29500


class JobRef(ApiModel):
    """Which FineTuneJob this run belongs to."""

    name: str
    namespace: str = "default"
    uid: str = ""


class TrainerConfig(ApiModel):
    """Everything a rank needs to train; nothing it must ask the Kubernetes API for."""

    version: Literal["kubetune.io/trainer-config/v1"] = TRAINER_CONFIG_VERSION
    job: JobRef
    spec: FineTuneJobSpec
    world_size: int = Field(ge=1)
    """nodes x procsPerNode."""
    gradient_accumulation_steps: int = Field(ge=1)
    """globalBatchSize / (perDeviceBatchSize x worldSize); 1 when no global batch is set."""
    progress_port: int = Field(default=DEFAULT_PROGRESS_PORT, ge=1, le=65535)
    """Rank 0 serves /progress and /metrics here."""
    rdzv_port: int = Field(default=DEFAULT_RDZV_PORT, ge=1, le=65535)
    """torchrun's rendezvous port on rank 0."""
    resume_from: str | None = None
    """Another run's output URI: when this run has no checkpoint of its own yet, start from that run's newest
    complete checkpoint (a new run after an edit, with spec.output.resumeFrom: previous)."""

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))
