"""FineTuneJob spec -> TrainerConfig. Pure; shared by the operator and `kubetune run`.

The backend (DDP or DeepSpeed ZeRO) and the DeepSpeed config are not rendered here: the trainer
alone decides, at start, when it knows the model and the GPU (kubetune_trainer.backend).
"""

from __future__ import annotations

from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT, JobRef, TrainerConfig


def gradient_accumulation_steps(spec: FineTuneJobSpec) -> int:
    micro = spec.training.per_device_batch_size * spec.distributed.world_size
    if spec.training.global_batch_size is None:
        return 1
    if spec.training.global_batch_size % micro:
        raise ValueError(
            f"spec.training.globalBatchSize ({spec.training.global_batch_size}) must be a multiple of "
            f"perDeviceBatchSize x world size ({micro})"
        )
    return spec.training.global_batch_size // micro


def render_trainer_config(
    spec: FineTuneJobSpec,
    name: str,
    namespace: str = "default",
    uid: str = "",
    progress_port: int = DEFAULT_PROGRESS_PORT,
    run: int = 1,
) -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid, run=run),
        spec=spec,
        world_size=spec.distributed.world_size,
        gradient_accumulation_steps=gradient_accumulation_steps(spec),
        progress_port=progress_port,
    )
