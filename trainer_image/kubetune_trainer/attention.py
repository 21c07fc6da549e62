"""Padding-free attention: every micro-batch is one flattened row of whole examples.

The collator (batching.py) concatenates a micro-batch's examples into one row, with position_ids
restarting at 0 for each example, int32 `cu_seq_lens_q/k` (where each example starts) and a
constant `max_length_q/k` (the longest an example can be, so nothing is read back to the host).
The model passes those keyword arguments down to its attention layers, where this function runs:

- on CUDA in half precision, `torch.nn.attention.varlen.varlen_attn` (flash-attention varlen, a
  custom op that torch.compile can trace), causal through `window_size=(-1, 0)`. That must be a
  tuple: torch 2.11 tests `window_size == (-1, 0)`, so a list silently runs non-causal. Key and
  value keep their own (fewer) heads: the flash kernel does grouped-query attention itself;
- elsewhere (CPU, fp32), scaled-dot-product attention per example, so CI runs the same maths.

It is registered under ATTN_NAME without a mask function, so transformers builds no attention mask
at all: no dense block-diagonal mask, no repeated KV heads, no host sync in the mask check.
Without the varlen arguments (evaluation of an unflattened batch, a plain forward) it takes the
examples' boundaries from position_ids restarts, or from a 2-D padding mask, or treats each row
as one sequence.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "kubetune_varlen"
CAUSAL = (-1, 0)  # a tuple: varlen_attn compares with ==, and a list is silently non-causal


ENV_DISABLE = "KUBETUNE_VARLEN"  # "0": keep the model's own attention implementation


def enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1") != "0"


def register() -> str:
    """Make ATTN_NAME a transformers attention implementation (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    return ATTN_NAME


def use(model: Any) -> bool:
    """Switch a loaded model (or the model inside peft's wrappers) to padding-free attention.
    False when its architecture does not take the varlen keyword arguments."""
    register()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(
        lm, "_supports_attention_backend", False
    ):  # layers that pass **kwargs to a registered attention function
        return False
    lm.set_attn_implementation(ATTN_NAME)
    return True


def cu_seq_lens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each example starts in the flattened (rows x length) layout: at every position 0 and
    every row start, plus the total. int32, as flash-attention wants."""
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True
    idx = starts.nonzero().flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([idx, total]).to(torch.int32)


def _boundaries(
    query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int]:
    batch, _, length, _ = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q needs one flattened row per micro-batch, got {batch} rows")
        max_len = kwargs.get("max_length_q")
        return cu.to(device=query.device, dtype=torch.int32), int(max_len) if max_len is not None else length
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] == length:
        return cu_seq_lens_from_positions(position_ids.expand(batch, -1).to(query.device)), length
    if attention_mask is not None and attention_mask.dim() == 2:
        # Right padding: each row's tokens, then its padding as a segment of its own (its output is ignored).
        lengths = attention_mask.sum(-1).tolist()
        starts = [b * length + s for b, n in enumerate(lengths) for s in ((0, n) if 0 < n < length else (0,))]
        return torch.tensor([*starts, batch * length], dtype=torch.int32, device=query.device), length
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device), length


def _sdpa_per_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """q: (T, Hq, D), k/v: (T, Hkv, D) -> (T, Hq, D); causal attention inside each [cu[i], cu[i+1])."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        if end <= start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        mask = None
        if window is not None:
            i = torch.arange(end - start, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=ks.shape[1] != qs.shape[1],
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The dtype the flash kernel runs in here, or None when it cannot run (CPU, fp32 without autocast)."""
    if not query.is_cuda:
        return None
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return None


def varlen_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, Hq, T, D), key/value (B, Hkv, T, D) -> (B, T, Hq, D)."""
    if softcap is not None or (dropout and module.training):
        raise NotImplementedError(
            f"{ATTN_NAME} supports neither logit soft-capping nor attention dropout; set KUBETUNE_VARLEN=0"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        raise NotImplementedError(
            f"{ATTN_NAME} got a 4-D mask: the model was built for another attention implementation"
        )
    batch, _, length, _ = query.shape
    cu, max_len = _boundaries(query, attention_mask, kwargs)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    half = _half_dtype(query)
    if half is not None:
        from torch.nn.attention.varlen import varlen_attn

        window = CAUSAL if sliding_window is None else (sliding_window - 1, 0)
        out = varlen_attn(
            q.to(half), k.to(half), v.to(half), cu, cu, max_len, max_len, scale=scaling, window_size=window
        )
    else:
        out = _sdpa_per_segment(q, k, v, cu, scaling, sliding_window)
    return out.view(batch, length, *out.shape[1:]), None  # type: ignore[union-attr]
