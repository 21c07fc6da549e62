"""Precision, resolved in one place: the compute precision Accelerate and DeepSpeed run in, and
the dtype the weights load in."""

from __future__ import annotations

from typing import Literal

import torch
from kubetune.api.models import FineTuneJobSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Precision = Literal["fp32", "bf16", "fp16"]


def compute_precision(spec: FineTuneJobSpec, on_gpu: bool) -> Precision:
    """spec.training.precision resolved: bf16 on GPUs for `auto`, fp32 on CPU whatever was asked."""
    if not on_gpu:
        return "fp32"
    asked = spec.training.precision
    return "bf16" if asked == "auto" else asked


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """spec.model.dtype resolved: `auto` is bf16 where the GPU supports it; CPU is always fp32."""
    if name == "auto":
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if not on_gpu:
        return torch.float32  # CPU kernels train in fp32; half types are slow or unsupported there
    return DTYPES[name]


def training_dtype(spec: FineTuneJobSpec, on_gpu: bool, deepspeed: bool) -> torch.dtype:
    """dtype to load the weights in for training.

    `auto` full fine-tuning under DDP loads fp32 and lets Accelerate autocast to bf16, so
    AdamW updates fp32 master weights; DeepSpeed keeps its own fp32 master copy, and
    LoRA's frozen base can stay in bf16 (peft keeps the adapter in fp32).
    """
    if spec.model.dtype == "auto" and spec.method == "full" and not deepspeed:
        return torch.float32
    if spec.model.quantization is not None and on_gpu and spec.model.dtype == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        )  # QLoRA computes in half precision
    return resolve_dtype(spec.model.dtype, on_gpu)
