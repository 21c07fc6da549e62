"""FineTuneJob spec -> DeepSpeed config (a plain dict). Pure; the trainer hands it to Accelerate.

Batch sizes are written out explicitly (not "auto") so the config is complete data
that DeepSpeed can check on its own: micro batch x accumulation x world size = train batch.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.models import FineTuneJobSpec


def uses_deepspeed(spec: FineTuneJobSpec, gpus_available: bool | None = None) -> bool:
    """`auto` picks DeepSpeed only for multi-GPU jobs; DDP is simpler and enough elsewhere."""
    backend = spec.distributed.backend
    if backend == "auto":
        gpus = spec.distributed.gpus_per_node if gpus_available is None else (1 if gpus_available else 0)
        return gpus > 0 and spec.distributed.nodes * spec.distributed.procs_per_node > 1
    return backend == "deepspeed"


def precision(spec: FineTuneJobSpec, on_gpu: bool) -> str:
    """Resolved compute precision: bf16 on GPUs for `auto`, fp32 on CPU whatever was asked."""
    if not on_gpu:
        return "fp32"
    return "bf16" if spec.training.precision == "auto" else spec.training.precision


def render_deepspeed_config(
    spec: FineTuneJobSpec, world_size: int, gradient_accumulation_steps: int, on_gpu: bool = True
) -> dict[str, Any]:
    dist = spec.distributed
    micro = spec.training.per_device_batch_size
    prec = precision(spec, on_gpu)
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.offload_params and dist.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro * gradient_accumulation_steps * world_size,
        "gradient_clipping": spec.training.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        # The trainer passes its own torch AdamW (works on CPU and GPU); DeepSpeed must accept it,
        # including with optimizer offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
