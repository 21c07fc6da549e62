"""Typed FineTuneJob API models: the single source of truth for the CRD, the operator and the trainer."""

from kubetune.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    TRAINED_FIELDS,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from kubetune.api.trainer_config import JobRef, TrainerConfig

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "TRAINED_FIELDS",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "JobRef",
    "TrainerConfig",
]
