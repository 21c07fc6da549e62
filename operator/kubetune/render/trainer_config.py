"""FineTuneJob spec -> TrainerConfig. Pure; shared by the operator and `kubetune run`.

The backend (DDP or DeepSpeed ZeRO) and the DeepSpeed config are not rendered here: the trainer
alone decides, at start, when it knows the model and the GPU (kubetune_trainer.backend).
"""

from __future__ import annotations

from kubetune.api import elastic
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT, JobRef, TrainerConfig


def gradient_accumulation_steps(spec: FineTuneJobSpec, nodes: int | None = None) -> int:
    """globalBatchSize / (perDeviceBatchSize x world size) at `nodes` nodes (default all); 1 without a global batch."""
    if spec.training.global_batch_size is None and (nodes is None or nodes == spec.distributed.nodes):
        return 1
    return elastic.accumulation(spec, nodes)


def render_trainer_config(
    spec: FineTuneJobSpec,
    name: str,
    namespace: str = "default",
    uid: str = "",
    progress_port: int = DEFAULT_PROGRESS_PORT,
    run: int = 1,
    nodes: int | None = None,
) -> TrainerConfig:
    """The config of one gang; `nodes`: how many nodes it trains on (elastic resume: fewer than
    spec.distributed.nodes), default all of them."""
    n = spec.distributed.nodes if nodes is None else nodes
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid, run=run),
        spec=spec,
        world_size=n * spec.distributed.procs_per_node,
        gradient_accumulation_steps=gradient_accumulation_steps(spec, n),
        progress_port=progress_port,
    )
