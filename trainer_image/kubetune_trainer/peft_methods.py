"""One peft config per adapter method (lora, dora, ia3, prompt_tuning, prefix_tuning), and QLoRA's k-bit loading.

Everything here is a pure mapping from the spec's typed blocks to peft/transformers objects, so each
method is tested by building it on the tiny model; `model.prepare_model` applies the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import ExitCode
from kubetune.api.models import (
    FineTuneJobSpec,
    Ia3Spec,
    LoraSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    QuantizationSpec,
)

from kubetune_trainer.errors import TrainerError


def lora_config(lora: LoraSpec, dora: bool = False) -> Any:
    from peft import LoraConfig

    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    alpha: Any = lora.alpha  # peft annotates int; any positive number works (scaling = alpha / r)
    return LoraConfig(
        r=lora.r,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=list(lora.modules_to_save) or None,
        use_rslora=lora.use_rslora,
        use_dora=dora,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        task_type="CAUSAL_LM",
    )


def ia3_config(ia3: Ia3Spec) -> Any:
    from peft import IA3Config

    return IA3Config(
        target_modules=list(ia3.target_modules) or None,
        feedforward_modules=list(ia3.feedforward_modules) or None,
        task_type="CAUSAL_LM",
    )


def prompt_tuning_config(pt: PromptTuningSpec, model_dir: Path) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    if pt.init_text is None:
        return PromptTuningConfig(
            num_virtual_tokens=pt.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
            task_type="CAUSAL_LM",
        )
    return PromptTuningConfig(
        num_virtual_tokens=pt.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=pt.init_text,
        tokenizer_name_or_path=str(model_dir),
        task_type="CAUSAL_LM",
    )


def prefix_tuning_config(pt: PrefixTuningSpec) -> Any:
    from peft import PrefixTuningConfig

    kwargs: dict[str, Any] = {"encoder_hidden_size": pt.encoder_hidden_size} if pt.encoder_hidden_size else {}
    return PrefixTuningConfig(
        num_virtual_tokens=pt.num_virtual_tokens,
        prefix_projection=pt.projection,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def peft_config(spec: FineTuneJobSpec, model_dir: Path) -> Any:
    """The peft config for the job's adapter method (defaults where its block is omitted)."""
    method = spec.method
    if method in ("lora", "dora"):
        return lora_config(spec.lora or LoraSpec(), dora=method == "dora")
    if method == "ia3":
        return ia3_config(spec.ia3 or Ia3Spec())
    if method == "prompt_tuning":
        return prompt_tuning_config(spec.prompt_tuning or PromptTuningSpec(), model_dir)
    if method == "prefix_tuning":
        return prefix_tuning_config(spec.prefix_tuning or PrefixTuningSpec())
    raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.method: {method} is not an adapter method")


BLOCK = {
    "lora": "spec.lora",
    "dora": "spec.lora",
    "ia3": "spec.ia3",
    "prompt_tuning": "spec.promptTuning",
    "prefix_tuning": "spec.prefixTuning",
}


def apply_adapter(model: Any, spec: FineTuneJobSpec, model_dir: Path) -> Any:
    """Wrap the model in the method's peft adapter; a target peft cannot place is ConfigInvalid naming the block."""
    from peft import get_peft_model

    config = peft_config(spec, model_dir)
    try:
        return get_peft_model(model, config)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainerError(ExitCode.CONFIG_INVALID, f"{BLOCK[spec.method]}: {exc}") from exc


# ------------------------------------------------------------------ QLoRA


def bitsandbytes_config(q: QuantizationSpec, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig: 4-bit nf4/fp4 (double quantization optional) computing in
    `compute_dtype`, or 8-bit LLM.int8."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def bitsandbytes_missing() -> str | None:
    """Why k-bit loading cannot run here, or None when it can (bitsandbytes >= 0.50 runs on CUDA and on CPU)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed in the trainer image (pip install 'bitsandbytes>=0.50')"
    return None


def prepare_kbit(model: Any, gradient_checkpointing: bool) -> Any:
    """peft's k-bit preparation: norms and head in fp32, input gradients on (so checkpointing works
    with a frozen quantized base)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
