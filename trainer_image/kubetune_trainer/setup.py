"""Setup, in the order a run needs it: backend and accelerator, then model, data and optimizer.

`start_runtime` builds what every run has (the accelerator, the world, the output store);
`build_parts` builds what training needs, prepared by Accelerate.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from kubetune.api import elastic, methods
from kubetune.api.contract import ExitCode
from kubetune.api.models import DpoSpec, FineTuneJobSpec, NetworkReport
from kubetune.api.trainer_config import TrainerConfig

from kubetune_trainer import batching, netcheck, order, preflight
from kubetune_trainer import data as data_mod
from kubetune_trainer import dpo as dpo_mod
from kubetune_trainer import loss as loss_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer import optim as optim_mod
from kubetune_trainer.backend import BackendChoice, build_accelerator, choose_backend
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.evaluation import exact_match, score_loss
from kubetune_trainer.log import log
from kubetune_trainer.precision import resolve_dtype
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.state import RunFacts
from kubetune_trainer.storage import OutputStore

ENV_FUSED_ADAMW = "KUBETUNE_FUSED_ADAMW"
LOADER_WORKERS_GPU = 2


@dataclass
class ModelFiles:
    """The pretrained model's local directory, fetched on first use: a finished job never fetches it."""

    spec: FineTuneJobSpec
    _path: Path | None = field(default=None, repr=False)

    def path(self) -> Path:
        if self._path is None:
            self._path = model_mod.model_path(self.spec)
        return self._path


@dataclass(frozen=True)
class Runtime:
    """This process: the backend chosen, its accelerator, the world it trains in, where outputs go."""

    accelerator: Any
    backend: BackendChoice
    world_size: int
    on_gpu: bool
    store: OutputStore
    model_files: ModelFiles
    network: NetworkReport | None = None  # the network check before step 0 (netcheck.py), with several ranks

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)


@dataclass(frozen=True)
class Parts:
    """What the step loop trains, prepared by Accelerate."""

    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any | None
    gen_examples: list[tuple[list[int], list[int]]]
    total_steps: int
    reference: Any = None  # DPO's reference policy (a callable), or None
    eval_examples: list[Any] = field(
        default_factory=list
    )  # the whole eval set (rank 0 scores plain models on it)
    retain_examples: list[Any] = field(
        default_factory=list
    )  # spec.evaluation.retain, tokenized (rank 0 only)


def pick_backend(config: TrainerConfig, on_gpu: bool, model_dir: Callable[[], Path]) -> BackendChoice:
    """choose_backend with real sizes: for `auto` on several GPUs the model's config.json is sized
    against this GPU's memory (every rank reaches the same answer)."""

    def sizes() -> tuple[int, int]:
        state = model_mod.ddp_state_bytes(config.spec, model_dir(), on_gpu)
        return state, torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory

    return choose_backend(config.spec, on_gpu, sizes)


def start_runtime(config: TrainerConfig) -> Runtime:
    on_gpu = torch.cuda.is_available()
    files = ModelFiles(config.spec)
    backend = pick_backend(config, on_gpu, files.path)
    accelerator = build_accelerator(config, backend, on_gpu)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world_size != config.world_size:
        raise TrainerError(
            ExitCode.CONFIG_INVALID,
            f"torchrun started {world_size} processes but the config expects worldSize {config.world_size}",
        )
    network = netcheck.check(config.spec.distributed.network_check, accelerator.device)
    store = OutputStore(config.spec.output.uri, config.spec.storage)
    return Runtime(accelerator, backend, world_size, on_gpu, store, files, network)


def build_parts(config: TrainerConfig, rt: Runtime, facts: RunFacts, progress: ProgressState) -> Parts:
    spec, acc = config.spec, rt.accelerator
    path = rt.model_files.path()
    tokenizer = model_mod.load_tokenizer(path, spec.model.trust_remote_code)
    train, evals, gen_examples = load_data(config, rt, tokenizer, facts, progress)
    samples = gen_examples[: spec.training.eval_generation_samples]
    if rt.is_main and samples:
        facts.exact_match_before = exact_match(model_mod.plain_model(path, spec), samples, tokenizer)
        log(f"exact match before training: {facts.exact_match_before:.3f}")
    retain = score_retain_before(spec, rt, path, tokenizer, facts) if rt.is_main else []
    raw_model = build_model(spec, rt, path, facts)
    raw_optimizer = build_optimizer(spec, raw_model, rt)
    varlen = bool(facts.fast_path.get("varlenAttention"))
    train_loader, eval_loader = build_loaders(spec, rt, train, evals, tokenizer.pad_token_id, varlen)
    model, optimizer, train_loader = acc.prepare(raw_model, raw_optimizer, train_loader)
    eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
    reference = build_reference(spec, rt, path, model) if spec.objective == "dpo" else None
    total_steps = plan_steps(spec, len(train_loader), config.gradient_accumulation_steps)
    scheduler = build_scheduler(spec, raw_optimizer, total_steps)
    acc.register_for_checkpointing(scheduler)
    return Parts(tokenizer, model, optimizer, scheduler, train_loader, eval_loader, gen_examples, total_steps, reference,
                 eval_examples=evals if spec.objective == "sft" else [], retain_examples=retain)  # fmt: skip


def score_retain_before(
    spec: FineTuneJobSpec, rt: Runtime, path: Path, tokenizer: Any, facts: RunFacts
) -> list[Any]:
    """spec.evaluation.retain tokenized, and the base model's loss on it (forgetting is measured against it)."""
    retain_spec = spec.evaluation.retain if spec.evaluation is not None else None
    if retain_spec is None:
        return []
    retain, _, _, report = data_mod.load_examples(retain_spec, spec.storage, tokenizer, spec.training.seed)
    facts.retain_loss_before = score_loss(
        model_mod.plain_model(path, spec), retain, tokenizer.pad_token_id, retain_spec.packing
    )
    log(
        f"retain set: {len(retain)} sequences ({report['trainTokens']} tokens); base model's loss {facts.retain_loss_before:.4f}"
    )
    return retain


def load_data(
    config: TrainerConfig, rt: Runtime, tokenizer: Any, facts: RunFacts, progress: ProgressState
) -> tuple[list[Any], list[Any], list[Any]]:
    """Train and eval examples (preference pairs for objective dpo) and generation pairs; rank 0 logs the
    data report and the memory estimate, and reports a data warning with its progress."""
    spec = config.spec
    gen_examples: list[Any] = []
    train: list[Any]
    evals: list[Any]
    if spec.objective == "dpo":
        pairs = dpo_mod.build_pairs(spec.dataset, spec.storage, tokenizer, spec.training.seed)
        train, evals = pairs.train, pairs.evals
        for source in pairs.sources if rt.is_main else []:
            log(dpo_mod.source_line(source))
    else:
        train, evals, gen_examples, facts.data = data_mod.load_examples(
            spec.dataset, spec.storage, tokenizer, spec.training.seed
        )
    data_mod.check_batch(len(train), spec.training, rt.world_size, config.gradient_accumulation_steps)
    if rt.is_main:
        log(
            f"{len(train)} training and {len(evals)} evaluation {'preference pairs' if spec.objective == 'dpo' else 'sequences'}"
        )
    if rt.is_main and facts.data:
        for line in data_mod.report_lines(facts.data, spec.dataset):
            log(line)
        if warning := data_mod.data_warning(facts.data, spec.dataset):
            progress.update(data_warning=warning)
        log(
            preflight.memory_line(
                spec, rt.model_files.path(), facts.data["longest"], rt.on_gpu, rt.backend.deepspeed
            )
        )
    return train, evals, gen_examples


def build_model(spec: FineTuneJobSpec, rt: Runtime, path: Path, facts: RunFacts) -> Any:
    model = model_mod.prepare_model(spec, path, rt.on_gpu, rt.backend.deepspeed)
    if spec.training.neftune_alpha is not None:
        optim_mod.install_neftune(model, spec.training.neftune_alpha)
    trainable, total = model_mod.trainable_parameters(model)
    if (
        q := spec.model.quantization
    ) is not None:  # what bitsandbytes really built: its k-bit layers under the adapter
        facts.quantized_layers = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
        if rt.is_main:
            log(
                f"QLoRA: {facts.quantized_layers} linear layers at {q.bits} bits ({q.type if q.bits == 4 else 'int8'})"
            )
    facts.chunked_loss = loss_mod.installed(model)
    facts.fast_path = model_mod.fast_path(model)
    if rt.is_main:
        log(
            f"method {spec.method}: {trainable:,} of {total:,} parameters trainable; fast path {facts.fast_path}"
        )
        if facts.chunked_loss:
            log("loss: chunked linear + cross-entropy (no full logits)")
        else:
            log(
                f"loss: the model's own ({loss_mod.supported(model) or 'off under ZeRO-3, or KUBETUNE_CHUNKED_LOSS=0'})"
            )
    return model


def build_optimizer(spec: FineTuneJobSpec, model: Any, rt: Runtime) -> torch.optim.Optimizer:
    """AdamW over parameter groups that carry LoRA+, the head's rate and layer-wise decay (one group
    when none is set). Fused (one kernel per step) on CUDA under DDP; DeepSpeed manages (and may
    offload) the state itself."""
    groups = optim_mod.param_groups(model, spec)
    if rt.is_main and len(groups) > 1:
        log("learning rates: " + ", ".join(f"{len(g['params'])} tensors at {g['lr']:.2e}" for g in groups))
    # KUBETUNE_FUSED_ADAMW=1 forces it on the CPU too (tests of the on-device skip), 0 turns it off.
    fused = os.environ.get(ENV_FUSED_ADAMW, "1" if rt.on_gpu else "0") == "1" and not rt.backend.deepspeed
    t = spec.training
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)


def build_reference(spec: FineTuneJobSpec, rt: Runtime, path: Path, model: Any) -> Any:
    """DPO's reference policy: the adapters-off base (adapter methods), a frozen copy (full), or None."""
    dpo, acc = spec.dpo or DpoSpec(), rt.accelerator
    copy = None
    if dpo.reference_model == "frozen-copy" and not methods.is_adapter(spec):
        with model_mod.no_zero3_init():  # a whole copy per rank, outside ZeRO-3's partitioning
            dtype = resolve_dtype(spec.model.dtype, rt.on_gpu)
            copy = model_mod.load_model(path, dtype, spec.model.trust_remote_code).to(acc.device).eval()
        copy.requires_grad_(False)
    if rt.is_main:
        kind = (
            "none (reference-free)"
            if dpo.reference_model == "none"
            else ("the base with adapters off" if copy is None else "a frozen copy")
        )
        log(f"objective dpo ({dpo.loss_type}, beta {dpo.beta}); reference: {kind}")
    return dpo_mod.reference_for(methods.is_adapter(spec), dpo, acc.unwrap_model(model), copy)


def build_loaders(
    spec: FineTuneJobSpec, rt: Runtime, train: list[Any], evals: list[Any], pad_id: int, varlen: bool
) -> tuple[Any, Any | None]:
    """Rows padded to the longest (packed rows carry position_ids), DPO pairs, or with varlen attention,
    micro-batches by token budget (perDeviceBatchSize x maxSeqLength), each one flattened row (batching.py)."""
    workers = (
        LOADER_WORKERS_GPU if rt.on_gpu else 0
    )  # collate in worker processes on GPU machines; in-process on CPU
    args: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": rt.on_gpu,
        "persistent_workers": workers > 0,
    }
    if varlen:
        budget = spec.training.per_device_batch_size * spec.dataset.max_seq_length
        args.update(batch_size=1, collate_fn=batching.Flatten(spec.dataset.max_seq_length))
        train, evals = (
            batching.micro_batches(train, budget, spec.training.seed),
            batching.micro_batches(evals, budget),
        )
    elif spec.objective == "dpo":
        args.update(
            batch_size=spec.training.per_device_batch_size,
            collate_fn=functools.partial(dpo_mod.collate_pairs, pad_id=pad_id),
        )
    else:
        collate = functools.partial(data_mod.collate, pad_id=pad_id, packed=spec.dataset.packing)
        args.update(batch_size=spec.training.per_device_batch_size, collate_fn=collate)
    train_loader = torch.utils.data.DataLoader(
        cast(Any, train), **train_order(spec, len(train), args["batch_size"]), **args
    )
    eval_loader = torch.utils.data.DataLoader(cast(Any, evals), **args) if evals else None
    return train_loader, eval_loader


def train_order(spec: FineTuneJobSpec, size: int, loader_batch: int) -> dict[str, Any]:
    """The DataLoader's order: shuffled with the seed; in an elastic run (minNodes) the world-size-free
    GlobalOrder, cut to whole global batches (order.py)."""
    if not spec.distributed.elastic:
        return {"shuffle": True, "generator": torch.Generator().manual_seed(spec.training.seed)}
    step_items = order.items_per_step(
        elastic.global_batch(spec), spec.training.per_device_batch_size, loader_batch
    )
    return {"sampler": order.GlobalOrder(size, spec.training.seed, step_items)}


def plan_steps(spec: FineTuneJobSpec, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in the run: spec.training.maxSteps, or epochs x steps per epoch."""
    t = spec.training
    steps_per_epoch = max(1, batches_per_epoch // accumulation)
    return t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))


def build_scheduler(spec: FineTuneJobSpec, optimizer: Any, total_steps: int) -> Any:
    """Stepped by hand once per optimizer step (not through Accelerate, which scales by world size)."""
    from transformers import get_scheduler

    t = spec.training
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
