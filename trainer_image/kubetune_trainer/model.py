"""Pretrained model + tokenizer in; an adapter method (LoRA, DoRA, IA3, prompt/prefix tuning, QLoRA), full or partial (frozen) fine-tuning set up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import ExitCode
from kubetune.api.methods import is_adapter
from kubetune.api.models import FineTuneJobSpec, FreezeSpec, LoraSpec, QuantizationSpec

from kubetune_trainer import peft_methods
from kubetune_trainer.backend import ddp_state_bytes as state_bytes
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.precision import training_dtype
from kubetune_trainer.storage import fetch

# The dimensions a model's config.json must state (transformers would fill a missing one with its class default,
# a 7B-sized model for Llama), and the largest value taken as real: anything above is a typo, refused before
# a model (even a meta one: 1e9 layers are 1e9 modules) is built.
DIMENSIONS = {
    "hidden_size": 1 << 17,
    "num_hidden_layers": 10_000,
    "num_attention_heads": 4096,
    "vocab_size": 1 << 24,
}
OTHER_DIMENSIONS = {
    "intermediate_size": 1 << 20,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 26,
}


def model_path(spec: FineTuneJobSpec) -> Path:
    path = fetch(
        spec.model.source, spec.storage, "spec.model.source", ExitCode.MODEL_NOT_FOUND, spec.model.revision
    )
    check_dimensions(path)
    return path


def check_dimensions(path: Path) -> None:
    """Refuse a config.json that leaves out a dimension (naming each) or states one that is not a positive
    integer below its bound (DIMENSIONS, OTHER_DIMENSIONS); a text model inside a multimodal one is checked too."""
    import json

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        return  # the loader names the missing config.json itself
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise TrainerError(
            ExitCode.MODEL_NOT_FOUND, f"spec.model.source: {file} is not valid JSON ({exc})"
        ) from exc
    config = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    if not isinstance(config, dict):
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"spec.model.source: {file} is not a JSON object")
    aliases = _attribute_map(str(config.get("model_type") or raw.get("model_type") or ""))
    found = {
        name: next((config[k] for k in (name, (aliases or {}).get(name)) if k and k in config), None)
        for name in {**DIMENSIONS, **OTHER_DIMENSIONS}
    }
    if missing := [n for n in DIMENSIONS if found[n] is None] if aliases is not None else []:
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"spec.model.source: {file} does not state {', '.join(missing)}; "
                           "a model's config.json gives its dimensions (transformers would assume its defaults, a different model)")  # fmt: skip
    for name, limit in {**DIMENSIONS, **OTHER_DIMENSIONS}.items():
        value = found[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise TrainerError(
                ExitCode.MODEL_NOT_FOUND,
                f"spec.model.source: {file}: {name} is {value!r}; it must be a positive integer up to {limit:,}",
            )


def _attribute_map(model_type: str) -> dict[str, str] | None:
    """transformers' names for the standard dimensions in this model type (GPT-2: n_embd, n_layer...); None for
    a type transformers does not know (trust_remote_code), whose names cannot be checked."""
    from transformers import CONFIG_MAPPING

    try:
        return dict(CONFIG_MAPPING[model_type].attribute_map)
    except KeyError:
        return None


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TrainerError(
            ExitCode.MODEL_NOT_FOUND,
            f"spec.model.source: no usable tokenizer at {path}: {type(exc).__name__}: {exc}",
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: Path, dtype: torch.dtype, trust_remote_code: bool, quantization: QuantizationSpec | None = None
) -> Any:
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise TrainerError(
            ExitCode.MODEL_NOT_FOUND,
            f"spec.model.source: {path} holds no config.json; is it a Hugging Face model directory?",
        )
    kwargs: dict[str, Any] = {}
    if quantization is not None:
        missing = peft_methods.bitsandbytes_missing()
        if missing:
            raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.model.quantization: {missing}")
        kwargs["quantization_config"] = peft_methods.bitsandbytes_config(quantization, dtype)
        # Quantized where it runs: each DDP rank loads the whole quantized base onto its own GPU (or the CPU).
        kwargs["device_map"] = {
            "": int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
        }
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise TrainerError(
            ExitCode.MODEL_NOT_FOUND,
            f"spec.model.source: the model at {path} cannot be loaded (corrupt or incomplete?): {type(exc).__name__}: {exc}",
        ) from exc


@contextlib.contextmanager
def no_zero3_init() -> Iterator[None]:
    """Load a plain, whole model in one process while DeepSpeed ZeRO-3 is active.

    Under ZeRO-3 Accelerate registers a global HfDeepSpeedConfig, and from_pretrained
    then partitions new models across ranks with collectives; a model loaded by rank 0
    alone (merging the adapter, exact-match evaluation) would wait for the others forever.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def apply_lora(model: Any, lora: LoraSpec) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_methods.lora_config(lora))
    except ValueError as exc:
        raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.lora: {exc}") from exc


def layer_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (`...layers.<i>.` / `...h.<i>.`), if any."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in {"layers", "h", "blocks", "layer"} and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def apply_freeze(model: Any, freeze: FreezeSpec) -> None:
    """Freeze the embeddings + first N blocks, and/or everything but the named modules."""
    for name, param in model.named_parameters():
        if freeze.trainable_modules:
            param.requires_grad = any(m in name for m in freeze.trainable_modules)
        if freeze.first_n_layers:
            idx = layer_index(name)
            if (
                "embed" in name
                or "wte" in name
                or "wpe" in name
                or (idx is not None and idx < freeze.first_n_layers)
            ):
                param.requires_grad = False
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainerError(ExitCode.CONFIG_INVALID, "spec.freeze leaves no trainable parameter")


def prepare_model(spec: FineTuneJobSpec, path: Path, on_gpu: bool, deepspeed: bool = False) -> Any:
    """The model ready to train; `fast_path(model)` says which fast-path pieces it got."""
    from kubetune_trainer import attention, kernels

    model = load_model(
        path, training_dtype(spec, on_gpu, deepspeed), spec.model.trust_remote_code, spec.model.quantization
    )
    # No KV cache while training: with one, transformers skips the packed-sequence mask built from position_ids.
    model.config.use_cache = False
    # Prompt and prefix tuning put virtual tokens before each sequence, DPO batches chosen/rejected pairs, and
    # NEFTune scales its noise by the row's length: they keep one example per row and the model's own attention.
    flat = (
        attention.enabled()
        and spec.method not in ("prompt_tuning", "prefix_tuning")
        and spec.objective != "dpo"
        and spec.training.neftune_alpha is None
    )
    features: dict[str, Any] = {"varlenAttention": attention.use(model) if flat else False}
    features["ligerKernels"] = (
        kernels.apply_liger(model) if spec.model.quantization is None else []
    )  # before peft wraps
    if spec.model.quantization is not None:
        model = peft_methods.prepare_kbit(model, spec.training.gradient_checkpointing)
    elif spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.freeze is not None and spec.method == "full":
        apply_freeze(model, spec.freeze)
    if is_adapter(spec):
        model = peft_methods.apply_adapter(model, spec, path)
        # Under DDP on a GPU Accelerate autocasts to half precision: peft's fp32 copy of each adapter input is waste.
        if on_gpu and not deepspeed and spec.training.precision != "fp32":
            features["loraInputCastingOff"] = kernels.lora_input_casting_off(model)
    # ZeRO-3 partitions lm_head's weight outside its own forward: keep the model's loss there.
    if not (deepspeed and spec.distributed.zero_stage == 3):
        from kubetune_trainer import loss

        loss.install(model)
    features["compiledLayers"] = kernels.compile_layers(model)
    model.kubetune_fast_path = features
    return model


def fast_path(model: Any) -> dict[str, Any]:
    """What prepare_model switched on: varlen attention, Liger kernels, LoRA input casting off, compiled layers."""
    return dict(getattr(model, "kubetune_fast_path", {}))


def ddp_state_bytes(spec: FineTuneJobSpec, path: Path, on_gpu: bool) -> int:
    """Weights + gradients + AdamW state one GPU would hold under DDP, sized on an empty (meta)
    model built from config.json with the job's LoRA or freezing applied: nothing is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=spec.model.trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        model.tie_weights()  # inside init_empty_weights tying is skipped; a loaded model shares them
        with init_empty_weights():
            if spec.freeze is not None and spec.method == "full":
                apply_freeze(model, spec.freeze)
            if is_adapter(spec):
                model = peft_methods.apply_adapter(model, spec, path)
    except TrainerError:
        raise
    except Exception as exc:
        raise TrainerError(
            ExitCode.MODEL_NOT_FOUND,
            f"spec.model.source: cannot read the model's config at {path}: {type(exc).__name__}: {exc}",
        ) from exc
    trainable, total = trainable_parameters(model)
    weight = torch.empty((), dtype=training_dtype(spec, on_gpu, deepspeed=False)).element_size()
    # peft keeps adapter weights in fp32 whatever the base's dtype.
    if (
        spec.model.quantization is not None
    ):  # the frozen base at 4 or 8 bits (plus constants), not the load dtype
        frozen = total - trainable
        return state_bytes(total, trainable, 0, 4) + frozen * spec.model.quantization.bits // 8
    return state_bytes(total, trainable, weight, 4 if is_adapter(spec) else weight)


def trainable_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def plain_model(path: Path, spec: FineTuneJobSpec) -> Any:
    """The whole model in fp32 for evaluation in one process (generation), outside ZeRO-3."""
    with no_zero3_init():
        return load_model(path, torch.float32, spec.model.trust_remote_code).eval()
