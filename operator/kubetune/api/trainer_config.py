"""The trainer's config contract: rendered by the operator (and `kubetune run`), read by the trainer.

One typed object travels from the control side to every rank: the FineTuneJob's
spec with all defaults applied, plus what the control side resolved (world size,
gradient accumulation, where progress is served). The operator writes it as YAML
into the job's ConfigMap; the trainer loads it with `TrainerConfig.load()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import Field

from kubetune.api.models import TRAINED_FIELDS, ApiModel, FineTuneJobSpec

TRAINER_CONFIG_VERSION: Final = "kubetune.io/trainer-config/v1"
DEFAULT_PROGRESS_PORT = 8080
DEFAULT_RDZV_PORT = 29500


class JobRef(ApiModel):
    """Which FineTuneJob this run belongs to."""

    name: str
    namespace: str = "default"
    uid: str = ""
    run: int = Field(default=1, ge=1)
    """The FineTuneJob's run (status.run): a finished job edited (GitOps) trains again as run n+1."""


class TrainerConfig(ApiModel):
    """Everything a rank needs to train; nothing it must ask the Kubernetes API for."""

    version: Literal["kubetune.io/trainer-config/v1"] = TRAINER_CONFIG_VERSION
    job: JobRef
    spec: FineTuneJobSpec
    world_size: int = Field(ge=1)
    """This gang's nodes x procsPerNode: spec.distributed.nodes, or fewer (at least minNodes) after an elastic shrink."""
    gradient_accumulation_steps: int = Field(ge=1)
    """globalBatchSize / (perDeviceBatchSize x worldSize); 1 when no global batch is set and the gang is whole."""
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


RESUME_IGNORED: Final[tuple[str, ...]] = (
    "output",
    "training.loggingSteps",
    "training.evalSteps",
    "training.evalGenerationSamples",
    "training.earlyStopping",
    "distributed.networkCheck",
    "distributed.elasticWaitSeconds",
)
"""Trained fields (TRAINED_FIELDS) a checkpoint does not depend on: where results go and how often the run
logs or evaluates. Any other change means the checkpoint was trained by a different config."""


def resume_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The fields a checkpoint was trained with, as dotted camelCase paths -> values (a checkpoint keeps them)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif not any(prefix == ignored or prefix.startswith(ignored + ".") for ignored in RESUME_IGNORED):
            flat[prefix] = value

    walk("", {k: v for k, v in spec.model_dump(mode="json", by_alias=True).items() if k in TRAINED_FIELDS})
    return flat


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`spec.<field>: <saved> -> <current>` for every field that differs, sorted."""
    return [
        f"spec.{key}: {saved.get(key, 'unset')!s} -> {current.get(key, 'unset')!s}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
