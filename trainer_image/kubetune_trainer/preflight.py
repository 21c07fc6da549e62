"""Pre-flight: what the model will learn and whether it fits, before any GPU starts.

`kubetune preflight MANIFEST` prints it; the trainer logs the same summary on rank 0
before the model loads. Everything here reads the data, the tokenizer and the model's
config.json; no weights are loaded (the model is sized on the meta device).

The memory estimate per GPU (or per process on CPU) adds up:
- weights: every parameter in the training dtype (the LoRA adapter in fp32), split
  across ranks under ZeRO-3;
- gradients and DDP's gradient bucket, per trainable parameter (ZeRO-2/3 split them);
- AdamW's two fp32 moments, plus DeepSpeed's fp32 master copy (ZeRO-1+ split them,
  offloadOptimizer moves them to CPU);
- activations: about 34 x hidden bytes per token and layer in 16-bit (Korthikanti et
  al. 2022, with a fused attention kernel), doubled in fp32; with gradient checkpointing
  one hidden state per layer plus one layer's working set; LoRA with dropout adds each
  adapted linear's dropped-out input;
- logits: fp32 logits and their gradient, for one loss chunk when the chunked loss is
  installed (loss.py), else for every token of the micro-batch;
- a fixed allowance for the CUDA context and the allocator (none on CPU).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.models import FineTuneJobSpec, LoraSpec

from kubetune_trainer.data import IGNORE, Built

GIB = 1 << 30
CUDA_OVERHEAD = GIB  # context, cuBLAS workspace and allocator slack
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token, per layer, 16-bit
CHUNKED_LOSS_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]
    per: str  # "GPU" or "process"
    available: int | None  # bytes per GPU (or per process) the job gets, when known

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def line(self) -> str:
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.parts.items())
        head = f"estimated peak memory per {self.per}: {human(self.total)} ({parts})"
        if self.fits is False:
            return (
                head
                + f"; WARNING: more than the {human(self.available or 0)} available per {self.per}: use LoRA, gradientCheckpointing, a smaller perDeviceBatchSize or maxSeqLength, or DeepSpeed ZeRO-3"
            )
        return head + (f"; fits {human(self.available)}" if self.available else "")


def human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def parameter_counts(spec: FineTuneJobSpec, model_dir: Path) -> tuple[int, int, Any]:
    """(trainable, total, config) of the job's model with its LoRA or freezing, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune_trainer import model as model_mod

    model_mod.check_dimensions(model_dir)  # before anything is built: no 7B defaults, no 1e9 meta layers
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=spec.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        model.tie_weights()
        if spec.freeze is not None and spec.method == "full":
            model_mod.apply_freeze(model, spec.freeze)
        if spec.method == "lora":
            model = model_mod.apply_lora(model, spec.lora or LoraSpec())
    trainable, total = model_mod.trainable_parameters(model)
    return trainable, total, getattr(config, "text_config", config)


def _activation_bytes(spec: FineTuneJobSpec, config: Any, tokens: int, half: bool) -> int:
    """Activations kept for the backward pass (see the module docstring)."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    act_scale = 1 if half else 2
    per_layer = ACTIVATION_BYTES_PER_HIDDEN * hidden * act_scale
    if spec.training.gradient_checkpointing:
        activations = tokens * (layers * hidden * 2 * act_scale + per_layer)
    else:
        activations = tokens * layers * per_layer
    lora = spec.lora or LoraSpec()
    if (
        spec.method == "lora" and lora.dropout > 0
    ):  # each adapted linear keeps its dropped-out input (q k v o gate up: hidden; down: intermediate)
        intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
        held = (
            1 if spec.training.gradient_checkpointing else layers
        )  # recomputed layer by layer under checkpointing
        activations += tokens * held * (6 * hidden + intermediate) * (2 if half else 4)
    return activations


def estimate_memory(
    spec: FineTuneJobSpec, trainable: int, total: int, config: Any, tokens: int, on_gpu: bool, deepspeed: bool,
    available: int | None = None,
) -> MemoryEstimate:  # fmt: skip
    """Peak bytes one rank holds while training `tokens` tokens per micro-batch (see the module docstring)."""
    d = spec.distributed
    world = d.world_size
    half = on_gpu and spec.training.precision != "fp32"
    auto_fp32 = spec.model.dtype == "auto" and spec.method == "full" and not deepspeed
    weight_bytes = 4 if (not half or auto_fp32 or spec.model.dtype == "float32") else 2
    trainable_bytes = 4 if spec.method == "lora" else weight_bytes
    frozen = total - trainable
    stage = d.zero_stage if deepspeed else 0
    weights = frozen * weight_bytes + trainable * trainable_bytes
    if stage == 3:
        weights = 0 if d.offload_params else weights // world
    grads = trainable * trainable_bytes * (1 if deepspeed or world == 1 else 2)  # DDP keeps a bucket copy
    if stage >= 2:
        grads //= world
    optimizer = trainable * (8 + (4 if deepspeed and trainable_bytes == 2 else 0))
    if stage >= 1:
        optimizer = 0 if d.offload_optimizer else optimizer // world
    vocab = int(getattr(config, "vocab_size", 0))
    activations = _activation_bytes(spec, config, tokens, half)
    chunked = getattr(config, "model_type", "") in CHUNKED_LOSS_TYPES and stage != 3
    logit_tokens = min(tokens, max(16, min(8192, (1 << 26) // max(vocab, 1)))) if chunked else tokens
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logit_tokens * vocab * 4 * 2,
    }
    if on_gpu:
        parts["cuda"] = CUDA_OVERHEAD
    return MemoryEstimate(parts, "GPU" if on_gpu else "process", available)


def memory_limit_per_process(spec: FineTuneJobSpec) -> int | None:
    """Bytes per process from resources.limits.memory (CPU jobs), when set."""
    raw = spec.resources.limits.get("memory") or spec.resources.requests.get("memory")
    if not raw:
        return None
    units = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    for suffix, scale in units.items():
        if raw.endswith(suffix):
            try:
                return int(float(raw[: -len(suffix)]) * scale) // spec.distributed.procs_per_node
            except ValueError:
                return None
    try:
        return int(float(raw)) // spec.distributed.procs_per_node
    except ValueError:
        return None


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0


def length_stats(lengths: list[int], max_len: int) -> dict[str, Any]:
    over = sum(1 for n in lengths if n > max_len)
    edges = [max_len * f // 4 for f in (1, 2, 3, 4)]
    bins = [
        sum(1 for n in lengths if lo < n <= hi) for lo, hi in zip([0] + edges[:-1], edges, strict=True)
    ] + [over]
    return {
        "examples": len(lengths), "mean": round(statistics.fmean(lengths), 1) if lengths else 0,
        "p50": _percentile(lengths, 0.5), "p90": _percentile(lengths, 0.9), "p99": _percentile(lengths, 0.99), "max": max(lengths, default=0),
        "maxSeqLength": max_len, "overMaxSeqLength": over, "overShare": over / max(len(lengths), 1),
        "histogram": [{"upTo": e, "count": c} for e, c in zip(edges, bins, strict=False)] + [{"upTo": None, "count": over}],
    }  # fmt: skip


def steps_per_epoch(n_train: int, spec: FineTuneJobSpec, accum: int) -> int:
    """As the trainer counts: each rank's share of micro-batches, over gradient accumulation."""
    world = spec.distributed.world_size
    return max(1, math.ceil(n_train / world / spec.training.per_device_batch_size) // accum)


def rendered_examples(built: Built, tokenizer: Any, n: int) -> list[list[tuple[str, bool]]]:
    """The first example of each source in turn, then the next ones: (token text, learned) pairs."""
    order = [i for i in built.starts if i < len(built.train)]
    order += [i for i in range(len(built.train)) if i not in order]
    return [_pieces(built.train[i], tokenizer) for i in order[:n]]


def _pieces(example: Any, tokenizer: Any, limit: int = 256) -> list[tuple[str, bool]]:
    """Each token's text as it appears in the decoded sequence (prefix differences keep spaces and bytes right)."""
    out, previous = [], ""
    for k, label in enumerate(example.labels[:limit]):
        text = tokenizer.decode(example.input_ids[: k + 1])
        out.append(
            (
                text[len(previous) :]
                if text.startswith(previous)
                else tokenizer.decode([example.input_ids[k]]),
                label != IGNORE,
            )
        )
        previous = text
    if len(example.labels) > limit:
        out.append((f" ... ({len(example.labels) - limit} more tokens)", False))
    return out


def summarize(
    spec: FineTuneJobSpec,
    built: Built,
    tokenizer: Any,
    accum: int,
    memory: MemoryEstimate | None,
    n_examples: int = 3,
) -> dict[str, Any]:
    """Everything the pre-flight shows, as JSON-able data."""
    report = built.report()
    lengths = [n for s in built.sources for n in s.lengths]
    return {
        "sources": report["sources"],
        "eval": report["eval"],
        "lengths": length_stats(lengths, spec.dataset.max_seq_length),
        "overflow": {
            k: report[k]
            for k in ("truncated", "truncatedTokens", "dropped", "droppedTokens", "overflowShare")
        }
        | {"policy": spec.dataset.overflow},
        "trainSequences": report["trainSequences"],
        "evalSequences": report["evalSequences"],
        "tokensPerEpoch": report["trainTokens"],
        "learnedTokensPerEpoch": sum(sum(1 for x in e.labels if x != IGNORE) for e in built.train),
        **_schedule(spec, len(built.train), accum),
        "examples": [
            [{"text": text, "learned": learned} for text, learned in ex]
            for ex in rendered_examples(built, tokenizer, n_examples)
        ],
        "memory": _memory_summary(memory),
    }


def _schedule(spec: FineTuneJobSpec, n_train: int, accum: int) -> dict[str, int]:
    """Optimizer steps per epoch and in all, and the global batch size, as the trainer counts them."""
    per_epoch = steps_per_epoch(n_train, spec, accum)
    t = spec.training
    return {
        "stepsPerEpoch": per_epoch,
        "totalSteps": t.max_steps or max(1, math.ceil(t.epochs * per_epoch)),
        "globalBatchSize": t.global_batch_size or t.per_device_batch_size * spec.distributed.world_size,
    }


def _memory_summary(memory: MemoryEstimate | None) -> dict[str, Any] | None:
    if memory is None:
        return None
    return {
        "per": memory.per,
        "totalBytes": memory.total,
        "parts": memory.parts,
        "availableBytes": memory.available,
        "fits": memory.fits,
    }


def text_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as plain log lines (the trainer's log; the CLI draws it with rich)."""
    unit = "preference pairs" if summary.get("objective") == "dpo" else "examples"
    lines = [
        f"data {s['path']}: {s['mapping']}; {s['records']} records -> {s['examples']} {unit} (weight {s['weight']:g})"
        for s in summary["sources"]
    ]
    ln, o = summary["lengths"], summary["overflow"]
    lines.append(
        f"tokens per example: p50 {ln['p50']}, p90 {ln['p90']}, p99 {ln['p99']}, max {ln['max']} against maxSeqLength {ln['maxSeqLength']}: "
        f"{ln['overShare']:.1%} longer ({o['policy']}: {o['truncated']} truncated, {o['dropped']} dropped)"
    )
    lines.append(
        f"{summary['trainSequences']} training sequences, {summary['tokensPerEpoch']} tokens per epoch ({summary['learnedTokensPerEpoch']} learned); "
        f"{summary['stepsPerEpoch']} steps per epoch at global batch {summary['globalBatchSize']}; {summary['totalSteps']} steps planned"
    )
    m = summary["memory"]
    if m is not None:
        est = MemoryEstimate(m["parts"], m["per"], m["availableBytes"])
        lines.append(est.line())
    return lines


def accumulation(spec: FineTuneJobSpec) -> int:
    world = spec.distributed.world_size
    gbs = spec.training.global_batch_size
    return max(1, gbs // (spec.training.per_device_batch_size * world)) if gbs else 1


def job_memory(
    spec: FineTuneJobSpec,
    model_dir: Path,
    max_tokens: int,
    on_gpu: bool,
    deepspeed: bool | None,
    gpu_memory: int | None,
) -> MemoryEstimate:
    """The estimate for this job's model and batch; `deepspeed` None decides as backend `auto` does."""
    from kubetune_trainer.backend import choose_backend, ddp_state_bytes

    trainable, total, config = parameter_counts(spec, model_dir)
    if deepspeed is None:
        weight = 4 if (not on_gpu or (spec.model.dtype == "auto" and spec.method == "full")) else 2

        def sizes() -> tuple[int, int]:
            return ddp_state_bytes(
                total, trainable, weight, 4 if spec.method == "lora" else weight
            ), gpu_memory or 80 * GIB

        deepspeed = choose_backend(spec, on_gpu, sizes).deepspeed
    tokens = spec.training.per_device_batch_size * (
        spec.dataset.max_seq_length if spec.dataset.packing else min(max_tokens, spec.dataset.max_seq_length)
    )
    available = gpu_memory if on_gpu else memory_limit_per_process(spec)
    return estimate_memory(spec, trainable, total, config, tokens, on_gpu, deepspeed, available)


def run_preflight(
    spec: FineTuneJobSpec, n_examples: int = 3, gpu_memory: int | None = 80 * GIB
) -> dict[str, Any]:
    """Fetch the tokenizer and data, build the examples as the trainer would, and size the job. Raises
    TrainerError (exit 66 for data) for what would fail in the pods."""
    from kubetune_trainer import data
    from kubetune_trainer import model as model_mod

    model_dir = model_mod.model_path(spec)
    tokenizer = model_mod.load_tokenizer(model_dir, spec.model.trust_remote_code)
    if spec.objective == "dpo":
        return preflight_pairs(spec, model_dir, tokenizer, n_examples, gpu_memory)
    built = data.build(spec.dataset, spec.storage, tokenizer, spec.training.seed)
    accum = accumulation(spec)
    data.check_batch(len(built.train), spec.training, spec.distributed.world_size, accum)
    longest = max((n for s in built.sources for n in s.lengths), default=spec.dataset.max_seq_length)
    return summarize(
        spec, built, tokenizer, accum, _estimate(spec, model_dir, longest, gpu_memory), n_examples
    )


def _estimate(spec: FineTuneJobSpec, model_dir: Path, longest: int, gpu_memory: int | None) -> MemoryEstimate:
    """job_memory for the spec's own placement (GPUs or not) and backend (auto decides as the trainer does)."""
    on_gpu = spec.distributed.gpus_per_node > 0
    backend = {"ddp": False, "deepspeed": True}.get(spec.distributed.backend)
    return job_memory(spec, model_dir, longest, on_gpu, backend, gpu_memory)


def preflight_pairs(
    spec: FineTuneJobSpec, model_dir: Path, tokenizer: Any, n_examples: int, gpu_memory: int | None
) -> dict[str, Any]:
    """The pre-flight of objective dpo: preference pairs as the trainer reads them (prompt, and both replies with the
    scored tokens marked), their lengths against maxSeqLength, how many overflow, steps and memory."""
    from kubetune_trainer import data, dpo

    built = dpo.build_pairs(spec.dataset, spec.storage, tokenizer, spec.training.seed)
    accum = accumulation(spec)
    data.check_batch(len(built.train), spec.training, spec.distributed.world_size, accum)
    lengths = [n for s in built.sources for n in s.lengths]
    memory = _estimate(spec, model_dir, max(lengths, default=spec.dataset.max_seq_length), gpu_memory)
    return {
        "objective": "dpo",
        "sources": [s.summary() for s in built.sources],
        "eval": built.eval_source.summary() if built.eval_source else None,
        "lengths": length_stats(lengths, spec.dataset.max_seq_length),
        "overflow": _pair_overflow(
            built.sources + ([built.eval_source] if built.eval_source else []), spec.dataset.overflow
        ),
        "trainSequences": len(built.train),
        "evalSequences": len(built.evals),
        "tokensPerEpoch": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in built.train),
        "learnedTokensPerEpoch": sum(
            sum(1 for x in p.chosen_labels + p.rejected_labels if x != IGNORE) for p in built.train
        ),
        **_schedule(spec, len(built.train), accum),
        "examples": [],
        "pairs": [rendered_pair(p, tokenizer) for p in built.train[:n_examples]],
        "memory": _memory_summary(memory),
    }


def _pair_overflow(parts: list[Any], policy: str) -> dict[str, Any]:
    """How many pairs of the sources (and the eval split) were longer than maxSeqLength, and what `policy` did."""
    truncated, dropped = sum(p.truncated for p in parts), sum(p.dropped for p in parts)
    return {
        "truncated": truncated,
        "truncatedTokens": sum(p.truncated_tokens for p in parts),
        "dropped": dropped,
        "droppedTokens": sum(p.dropped_tokens for p in parts),
        "overflowShare": (truncated + dropped) / max(sum(p.records for p in parts), 1),
        "policy": policy,
    }


def rendered_pair(pair: Any, tokenizer: Any) -> dict[str, Any]:
    """A preference pair for people: the prompt's text, each reply as (token text, scored) pieces, and the lengths."""
    from kubetune_trainer.data import Example

    prompt_len = next((i for i, x in enumerate(pair.chosen_labels) if x != IGNORE), len(pair.chosen_labels))
    chosen = _pieces(Example(pair.chosen_ids, pair.chosen_labels, []), tokenizer)
    rejected = _pieces(Example(pair.rejected_ids, pair.rejected_labels, []), tokenizer)
    return {
        "prompt": tokenizer.decode(pair.chosen_ids[:prompt_len]),
        "chosen": [{"text": text, "learned": learned} for text, learned in chosen[prompt_len:]],
        "rejected": [{"text": text, "learned": learned} for text, learned in rejected[prompt_len:]],
        "promptTokens": prompt_len, "chosenTokens": len(pair.chosen_ids) - prompt_len, "rejectedTokens": len(pair.rejected_ids) - prompt_len,
    }  # fmt: skip


def memory_line(spec: FineTuneJobSpec, model_dir: Path, longest: int, on_gpu: bool, deepspeed: bool) -> str:
    """The trainer's pre-flight line on rank 0, before the model loads (sized against this GPU)."""
    try:
        gpu = None
        if on_gpu:
            import torch

            gpu = torch.cuda.get_device_properties(0).total_memory
        return job_memory(
            spec, model_dir, longest or spec.dataset.max_seq_length, on_gpu, deepspeed, gpu
        ).line()
    except Exception as exc:  # an estimate must never stop a run
        return f"no memory estimate: {type(exc).__name__}: {exc}"
