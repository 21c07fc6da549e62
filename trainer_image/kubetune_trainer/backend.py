"""DDP or DeepSpeed ZeRO: the trainer alone decides (it knows the model and the GPU), renders the
DeepSpeed config as data, and builds the Accelerator for the choice.

Batch sizes are written out explicitly (not "auto") so the DeepSpeed config is complete data
that DeepSpeed can check on its own: micro batch x accumulation x world size = train batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import TrainerConfig

DDP_BUCKET_MB = 100
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


def choose_backend(
    spec: FineTuneJobSpec, on_gpu: bool, sizes: Callable[[], tuple[int, int]] | None = None
) -> BackendChoice:
    """DDP or DeepSpeed for this run. `auto`: DDP on CPU, on one GPU, and when the model and its
    optimizer state fit one GPU (ZeRO only adds communication there); DeepSpeed ZeRO when they do
    not or when offload is asked.

    `sizes` returns (DDP state bytes, one GPU's bytes); it is called only when the answer depends on them.
    """
    dist = spec.distributed
    if dist.backend != "auto":
        return BackendChoice(dist.backend == "deepspeed", f"spec.distributed.backend is {dist.backend}")
    if spec.model.quantization is not None:
        return BackendChoice(
            False,
            "QLoRA: DDP (each GPU holds the quantized base; ZeRO does not partition bitsandbytes weights)",
        )
    if not on_gpu or dist.world_size == 1:
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


def deepspeed_config(
    spec: FineTuneJobSpec, world_size: int, gradient_accumulation_steps: int, on_gpu: bool
) -> dict[str, Any]:
    from kubetune_trainer.precision import compute_precision  # torch: imported only when a run needs it

    dist = spec.distributed
    micro = spec.training.per_device_batch_size
    prec = compute_precision(spec, on_gpu)
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


def skip_shm_op_unless_used() -> bool:
    """DeepSpeed on CPU compiles its shared-memory collectives (deepspeed_shm_comm, a C++ extension built with
    ninja) when it starts its process group, in every process that starts one: the pods' cache is empty, so every
    rank's pod compiled it at every start (about a minute of both cores of this machine, per pod and restart).
    The op only works when every rank shares one machine and says so in LOCAL_SIZE (DeepSpeed's own launcher
    sets it; torchrun sets LOCAL_WORLD_SIZE instead), otherwise it initialises to nothing and the collectives go
    over torch.distributed (gloo) anyway. So under torchrun it is marked unavailable and never built; also where
    it could not be built (no ninja or compiler: DeepSpeed would fail the process group's start). True when
    skipped."""
    import deepspeed.ops

    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_SIZE")
    if local is not None and local == world:
        from torch.utils.cpp_extension import verify_ninja_availability

        try:
            verify_ninja_availability()
            return False  # all ranks on this machine, as DeepSpeed's launcher says: the op serves them
        except RuntimeError:
            pass
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def build_accelerator(config: TrainerConfig, backend: BackendChoice, on_gpu: bool) -> Any:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    accum = config.gradient_accumulation_steps
    # DDP: gradients live in the all-reduce buckets (no copy), bigger buckets, and a static graph when there is no
    # accumulation (torch's reducer asserts when a static graph meets no_sync).
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True, static_graph=accum == 1, bucket_cap_mb=DDP_BUCKET_MB
    )
    common: dict[str, Any] = {
        "kwargs_handlers": [InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo"), ddp],
        "gradient_accumulation_steps": accum,
        # A seedable sampler makes each epoch's order a function of (seed, epoch): resume can skip what was seen.
        # Pinned batches (DataLoader workers pin them) are copied to the GPU without blocking the host.
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=on_gpu),
    }
    if backend.deepspeed:
        if not on_gpu:
            skip_shm_op_unless_used()
        ds = deepspeed_config(config.spec, config.world_size, accum, on_gpu)
        # Passing the process-group backend explicitly matters on CPU: without it Accelerate initialises
        # DeepSpeed's process group but records a single process, and every rank trains alone.
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), **common)
    if not on_gpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # else Accelerate under torchrun on CPU runs each rank alone
    from kubetune_trainer.precision import compute_precision

    mixed = compute_precision(config.spec, on_gpu).replace("fp32", "no")
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed, **common)
