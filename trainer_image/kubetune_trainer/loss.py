"""Causal-LM loss without materialising the logits.

A model's own forward builds logits of batch x sequence x vocabulary (for a 152k vocabulary at
8 x 2048 tokens that is 2.5 G values), upcasts them to fp32 for the cross-entropy and keeps them
for backward: the largest memory term of fine-tuning. Here the vocabulary projection and the
cross-entropy run over chunks of tokens, and each chunk's gradients (for the hidden states, the
projection's weight and bias) are computed right away and the chunk's logits dropped. Backward
only scales what was computed. The maths is the model's own loss: the mean over labelled tokens
of the cross-entropy of position t's logits against the label at t+1, in fp32.

Plain torch, so it runs the same on CPU and GPU. Installed per model instance by replacing the
instance's forward, so DDP, DeepSpeed ZeRO-1/2 and peft wrappers still call through it; only
architectures whose head is exactly `lm_head(final hidden state)` are patched.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubetune_trainer import kernels

IGNORE = -100
# Architectures whose CausalLM forward is decoder -> lm_head -> cross-entropy, nothing else
# (no logit soft-capping or scaling, no auxiliary losses).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
CHUNK_ELEMENTS = 1 << 26
"""fp32 logits per chunk (256 MiB): 441 tokens at a 152k vocabulary."""
ENV_DISABLE = "KUBETUNE_CHUNKED_LOSS"


def chunk_tokens(vocab: int) -> int:
    return max(16, min(8192, CHUNK_ELEMENTS // max(vocab, 1)))


def _add_chunk_grads(
    g: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], rows: slice,
) -> None:  # fmt: skip
    """Add one chunk's share to the gradients: d(sum CE)/d logits = softmax - one_hot, on labelled
    rows only (`scale` is 0 elsewhere), over the labelled count. `g` holds the chunk's softmax."""
    grad_h, grad_w, grad_b = grads
    g[torch.arange(g.shape[0], device=g.device), target] -= 1.0
    g.mul_(scale[:, None])
    gc = g.to(w.dtype)
    if grad_h is not None:
        grad_h[rows] = (gc @ w).to(grad_h.dtype)
    if grad_w is not None:
        if w.dtype == torch.float32:
            grad_w.addmm_(g.t(), h)
        else:
            grad_w += (gc.t() @ h).float()
    if grad_b is not None:
        grad_b += g.sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int,
        denominator: torch.Tensor | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        count = (labels != IGNORE).sum().clamp(min=1).float() if denominator is None else denominator.float()
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        # The matmuls run in autocast's dtype when it is on (as the model's own head would), else
        # in the weight's; softmax, the loss and the weight-gradient sum stay fp32.
        dev = hidden.device.type
        cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        w = weight.to(cdtype)
        b = bias.to(cdtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, n, chunk):
                h, y = hidden[start : start + chunk].to(cdtype), labels[start : start + chunk]
                logits = F.linear(h, w, b).float()
                valid = y != IGNORE
                target = y.clamp(min=0)
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
                if need_h or need_w or need_b:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    _add_chunk_grads(
                        g, target, valid / count, h, w, (grad_h, grad_w, grad_b), slice(start, start + chunk)
                    )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            (grad_h * scale.to(grad_h.dtype)) if grad_h is not None else None,
            (grad_w * scale).to(w_dtype) if grad_w is not None else None,
            (grad_b * scale).to(b_dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels` (IGNORE rows skipped), summed and divided by
    `denominator` (a tensor: the optimizer step's token count share, see train.py) or by the labelled rows.
    On CUDA with liger-kernel installed, Liger's fused Triton kernel; elsewhere the chunked function above."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if chunk is None and kernels.liger_available(hidden.device):
        total = kernels.fused_linear_cross_entropy_sum(hidden, weight, bias, labels)
        count = (labels != IGNORE).sum().clamp(min=1).float() if denominator is None else denominator.float()
        return total / count
    loss: torch.Tensor = _LinearCrossEntropy.apply(
        hidden, weight, bias, labels, chunk or chunk_tokens(weight.shape[0]), denominator
    )  # type: ignore[no-untyped-call]
    return loss


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside peft's wrappers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(head: Any) -> nn.Linear | None:
    """The nn.Linear that computes the logits now: the head itself, or, when peft trains it through
    modules_to_save, the active adapter's copy (the original while adapters are disabled)."""
    if type(head).__name__ == "ModulesToSaveWrapper":
        active = list(head.active_adapters)
        if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    return head if type(head) is nn.Linear else None


def supported(model: Any) -> str | None:
    """Why the chunked loss cannot be installed on this model, or None when it can."""
    lm = _causal_lm(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return f"model type {model_type!r} is not one with a plain lm_head"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if _plain_head(head) is None:
        return f"its lm_head is a {type(head).__name__}, not a plain Linear"
    if not hasattr(lm, "get_decoder"):
        return "it exposes no decoder"
    return None


def install(model: Any, chunk: int | None = None) -> bool:
    """Make `model(..., labels=...)` return the chunked loss (and no logits). False when not applicable."""
    if os.environ.get(ENV_DISABLE, "1") == "0" or supported(model) is not None:
        return False
    lm = _causal_lm(model)
    original = lm.forward
    decoder = lm.get_decoder()

    def forward(
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        labels: Any = None,
        **kwargs: Any,
    ) -> Any:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if labels is None:
            return original(**inputs, **kwargs)
        return _chunked_forward(lm, decoder, inputs, labels, chunk, kwargs)

    lm.forward = forward
    lm.kubetune_chunked_loss = True
    return True


def _chunked_forward(
    lm: Any, decoder: Any, inputs: dict[str, Any], labels: Any, chunk: int | None, kwargs: dict[str, Any]
) -> Any:
    """The decoder's hidden states through the chunked loss against the head's weights: the CausalLM output with
    the loss and no logits. transformers' `num_items_in_batch` is the loss's denominator."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("use_cache", None)
    denominator = kwargs.pop("num_items_in_batch", None)
    if denominator is not None and not isinstance(denominator, torch.Tensor):
        denominator = torch.tensor(float(denominator), device=hidden_device(lm))
    out = decoder(**inputs, use_cache=False, **kwargs)
    hidden = out[0]
    head = _plain_head(lm.get_output_embeddings())
    if head is None:
        raise TypeError(f"lm_head became a {type(lm.get_output_embeddings()).__name__}; set {ENV_DISABLE}=0")
    # Position t predicts the label at t+1, as the model's own loss shifts them.
    loss = linear_cross_entropy(hidden[:, :-1, :], head.weight, head.bias, labels[:, 1:], chunk, denominator)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def hidden_device(lm: Any) -> torch.device:
    device: torch.device = next(lm.parameters()).device
    return device


def installed(model: Any) -> bool:
    return bool(getattr(_causal_lm(model), "kubetune_chunked_loss", False))
