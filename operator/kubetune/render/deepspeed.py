"""FineTuneJob spec -> DeepSpeed config (a plain dict). Pure; the trainer hands it to Accelerate.

Batch sizes are written out explicitly (not "auto") so the config is complete data
that DeepSpeed can check on its own: micro batch x accumulation x world size = train batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api.models import FineTuneJobSpec


def uses_deepspeed(spec: FineTuneJobSpec, gpus_available: bool | None = None) -> bool:
    """Whether DeepSpeed may run: always for `deepspeed`; for `auto`, multi-GPU jobs, where the
    trainer makes the final choice at start with `choose_backend` (it knows the model and the GPU)."""
    backend = spec.distributed.backend
    if spec.model.quantization is not None and backend != "deepspeed":
        return False  # QLoRA: DDP; ZeRO does not partition bitsandbytes weights
    if backend == "auto":
        gpus = spec.distributed.gpus_per_node if gpus_available is None else (1 if gpus_available else 0)
        return gpus > 0 and spec.distributed.nodes * spec.distributed.procs_per_node > 1
    return backend == "deepspeed"


DDP_STATE_FRACTION = 0.6
"""`auto` picks DDP when weights + gradients + optimizer state take at most this share of one GPU's
memory; the rest is for activations, the CUDA context and the allocator's slack."""


def ddp_state_bytes(total_params: int, trainable_params: int, weight_bytes: int, trainable_bytes: int) -> int:
    """What one GPU holds under DDP before activations: every weight once, and per trainable
    parameter its gradient, AdamW's two moments and DDP's gradient bucket (four more copies)."""
    frozen = total_params - trainable_params
    return frozen * weight_bytes + trainable_params * trainable_bytes * 5


@dataclass(frozen=True)
class BackendChoice:
    deepspeed: bool
    reason: str

    @property
    def name(self) -> str:
        return "deepspeed" if self.deepspeed else "ddp"


def choose_backend(spec: FineTuneJobSpec, on_gpu: bool, sizes: Callable[[], tuple[int, int]] | None = None) -> BackendChoice:
    """DDP or DeepSpeed for this run. `auto`: DDP when the model and its optimizer state fit one
    GPU (ZeRO only adds communication there), DeepSpeed ZeRO when they do not or when offload is asked.

    `sizes` returns (DDP state bytes, one GPU's bytes); it is called only when the answer depends on them.
    """
    dist = spec.distributed
    if dist.backend != "auto":
        return BackendChoice(dist.backend == "deepspeed", f"spec.distributed.backend is {dist.backend}")
    if spec.model.quantization is not None:
        return BackendChoice(False, "QLoRA: DDP (each GPU holds the quantized base; ZeRO does not partition bitsandbytes weights)")
    if not uses_deepspeed(spec, gpus_available=on_gpu):
        return BackendChoice(False, "one GPU or CPU processes: DDP")
    if dist.offload_optimizer or dist.offload_params:
        return BackendChoice(True, "offload asked: DeepSpeed ZeRO")
    state_bytes, device_bytes = sizes() if sizes is not None else (0, 0)
    if not device_bytes:
        return BackendChoice(True, "model size unknown: DeepSpeed ZeRO")
    gib = 1024**3
    share = f"{state_bytes / gib:.1f} GiB of weights, gradients and optimizer state per GPU under DDP"
    budget = f"{DDP_STATE_FRACTION:.0%} of {device_bytes / gib:.0f} GiB"
    if state_bytes <= DDP_STATE_FRACTION * device_bytes:
        return BackendChoice(False, f"{share} fit in {budget}: DDP")
    return BackendChoice(True, f"{share} exceed {budget}: DeepSpeed ZeRO-{dist.zero_stage}")


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
