"""The CUDA fast path's optional pieces, each a no-op where it cannot help (CPU, a missing package).

- Liger's Triton kernels for RoPE, RMSNorm and SwiGLU, patched into the model instance before peft
  wraps it (peft then wraps the same Linear layers it would anyway);
- Liger's fused linear + cross-entropy (used by loss.py on CUDA) with a larger chunk budget:
  `chunk_mem_const` 8 moves far fewer bytes than the default of 1 at a vocabulary of 152k;
- LoRA under autocast: peft's cast of each adapter input up to fp32 turned off (autocast casts it
  back anyway; the fp32 copy is only saved activation memory);
- torch.compile of each decoder layer (KUBETUNE_COMPILE=1), kept off unless it wins on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

LIGER_CHUNK_MEM_CONST = 8
ENV_LIGER = "KUBETUNE_LIGER"  # "0": no Liger kernels even on CUDA
ENV_COMPILE = "KUBETUNE_COMPILE"  # "1": torch.compile each decoder layer
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                 "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}  # fmt: skip


def liger_available(device: torch.device | str | None = None) -> bool:
    """Liger runs (Triton on CUDA) and is wanted."""
    if os.environ.get(ENV_LIGER, "1") == "0" or importlib.util.find_spec("liger_kernel") is None:
        return False
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


def apply_liger(model: Any) -> list[str]:
    """RoPE, RMSNorm and SwiGLU from Liger on a plain transformers model (call before peft). Returns what was patched."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = LIGER_PATCHES.get(str(model_type))
    if name is None or not liger_available():
        return []
    import liger_kernel.transformers as lt

    # The loss stays loss.py's (which calls Liger's fused kernel itself, with the token-weighted denominator).
    getattr(lt, name)(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    return ["rope", "rms_norm", "swiglu"]


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Sum over labelled rows of cross-entropy(hidden @ weight.T + bias, labels), Liger's Triton kernel (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    with torch.autocast("cuda", enabled=False):
        return liger_fused_linear_cross_entropy(  # type: ignore[no-any-return]
            hidden.to(dtype), weight.to(dtype), labels, bias.to(dtype) if bias is not None else None,
            reduction="sum", accum_dtype=torch.float32, chunk_mem_const=LIGER_CHUNK_MEM_CONST,
        ).float()  # fmt: skip


def lora_input_casting_off(model: Any) -> int:
    """peft casts every adapter input to the adapter's fp32; under autocast that copy is only memory. Returns layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]
            changed += 1
    return changed


def compile_layers(model: Any) -> int:
    """torch.compile each decoder layer in place (the varlen attention is a custom op: no graph break). Returns layers."""
    if os.environ.get(ENV_COMPILE, "0") != "1":
        return 0
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
