"""Learning-rate controls: LoRA+ ratios, a separate rate for heads, layer-wise decay; and NEFTune noise.

`param_groups` returns AdamW parameter groups (every trainable parameter exactly once); the scheduler
scales each group's own rate, so the ratios hold through warmup and decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from kubetune.api.models import FineTuneJobSpec

from kubetune_trainer.model import layer_index

HEAD_NAMES = ("lm_head", "score", "classifier")
"""Output heads: the newly added or unfrozen layers `training.headLearningRate` applies to."""


def is_head(name: str) -> bool:
    return any(f"{h}." in name or name.endswith(h) for h in HEAD_NAMES)


def num_layers(model: Any) -> int:
    indices = {layer_index(n) for n, _ in model.named_parameters()}
    return max((i for i in indices if i is not None), default=-1) + 1


def learning_rate_for(name: str, spec: FineTuneJobSpec, layers: int) -> float:
    """The rate of one trainable parameter."""
    t = spec.training
    lr = t.learning_rate
    if is_head(name):
        return t.head_learning_rate or lr
    if t.layer_lr_decay is not None:
        idx = layer_index(name)
        if idx is not None:
            lr *= t.layer_lr_decay ** (layers - idx)
        elif "embed" in name or "wte" in name or "wpe" in name:
            lr *= t.layer_lr_decay ** (layers + 1)
    ratio = spec.lora.loraplus_lr_ratio if spec.lora is not None else None
    if ratio and ("lora_B" in name or "lora_embedding_B" in name):
        lr *= ratio  # LoRA+: B learns faster than A
    return lr


def param_groups(model: Any, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """AdamW groups by learning rate (one group when no control is set)."""
    layers = num_layers(model)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(learning_rate_for(name, spec, layers), []).append(param)
    return [{"params": params, "lr": lr} for lr, params in sorted(groups.items(), reverse=True)]


# ------------------------------------------------------------------ NEFTune


def neftune_hook(alpha: float) -> Any:
    """Forward hook for the input embeddings: uniform noise of scale alpha / sqrt(length x hidden),
    only while training (Jain et al., 2023; the same scale transformers and TRL use)."""

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return hook


def install_neftune(model: Any, alpha: float) -> Any:
    """Add NEFTune noise to the model's input embeddings; returns the hook handle."""
    embeddings = model.get_input_embeddings()
    return embeddings.register_forward_hook(neftune_hook(alpha))
