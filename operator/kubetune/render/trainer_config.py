"""FineTuneJob spec -> TrainerConfig. Pure; shared by the operator and `kubetune run`."""

from __future__ import annotations

from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import JobRef, TrainerConfig


def world_size(spec: FineTuneJobSpec) -> int:
    return spec.distributed.nodes * spec.distributed.procs_per_node


def gradient_accumulation_steps(spec: FineTuneJobSpec) -> int:
    micro = spec.training.per_device_batch_size * world_size(spec)
    if spec.training.global_batch_size is None:
        return 1
    if spec.training.global_batch_size % micro:
        raise ValueError(
            f"spec.training.globalBatchSize ({spec.training.global_batch_size}) must be a multiple of "
            f"perDeviceBatchSize x world size ({micro})"
        )
    return spec.training.global_batch_size // micro


def render_trainer_config(spec: FineTuneJobSpec, name: str, namespace: str = "default", uid: str = "") -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid),
        spec=spec,
        world_size=world_size(spec),
        gradient_accumulation_steps=gradient_accumulation_steps(spec),
    )
