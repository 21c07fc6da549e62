"""The recipe: setup -> train -> save -> cleanup. One Trainer per process; rank 0 also reports progress."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from kubetune.api import methods
from kubetune.api.contract import (
    ADAPTER_DIR,
    COMPLETE_MARKER,
    CONFIG_FILE,
    MERGED_DIR,
    METRICS_FILE,
    ExitCode,
)
from kubetune.api.models import DpoSpec
from kubetune.api.trainer_config import TrainerConfig
from kubetune.render.deepspeed import BackendChoice, choose_backend, render_deepspeed_config

from kubetune_trainer import batching, preflight, signals, steps, watchdog
from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer import data as data_mod
from kubetune_trainer import dpo as dpo_mod
from kubetune_trainer import loss as loss_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer import optim as optim_mod
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.progress import ProgressState, serve
from kubetune_trainer.storage import OutputStore, cache_root

ENV_DEBUG_DIR = "KUBETUNE_DEBUG_DIR"  # tests: each rank writes its world size and a weights digest here
ENV_DEBUG_STOP_AT_STEP = "KUBETUNE_DEBUG_STOP_AT_STEP"  # tests: preempt at exactly this step
ENV_FUSED_ADAMW = "KUBETUNE_FUSED_ADAMW"
DDP_BUCKET_MB = 100
LOADER_WORKERS_GPU = 2  # collate in worker processes on GPU machines; in-process on CPU (tests, laptops)


def log(msg: str) -> None:
    print(f"[kubetune] {msg}", flush=True)


@dataclass
class TrainState:
    """What a checkpoint needs besides accelerate's state: where we are and what we have seen."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in `epoch` (data position)
    best_eval: float | None = None
    evals_without_improvement: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0


def build_accelerator(config: TrainerConfig, use_deepspeed: bool) -> Any:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    on_gpu = torch.cuda.is_available()
    spec = config.spec
    accum = config.gradient_accumulation_steps
    # DDP: gradients live in the all-reduce buckets (no copy), bigger buckets, and a static graph when there is no
    # accumulation (torch's reducer asserts when a static graph meets no_sync).
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=accum == 1, bucket_cap_mb=DDP_BUCKET_MB)
    handlers: list[Any] = [InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo"), ddp]
    # A seedable sampler makes each epoch's order a function of (seed, epoch): resume can skip what was seen.
    # Pinned batches (DataLoader workers pin them) are copied to the GPU without blocking the host.
    loaders = DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=on_gpu)
    if use_deepspeed:
        ds = dict(config.deepspeed or render_deepspeed_config(spec, config.world_size, accum, on_gpu))
        if not on_gpu:  # fp32 on CPU whatever the rendered config says
            ds = {**ds, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
        # Passing backend explicitly matters on CPU: without it Accelerate initialises DeepSpeed's
        # process group but records a single process, and every rank trains alone.
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), kwargs_handlers=handlers, gradient_accumulation_steps=accum, dataloader_config=loaders)
    if not on_gpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # else Accelerate under torchrun on CPU runs each rank alone
    prec = spec.training.precision
    mixed = "no" if not on_gpu or prec == "fp32" else ("fp16" if prec == "fp16" else "bf16")
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed, kwargs_handlers=handlers, gradient_accumulation_steps=accum, dataloader_config=loaders)


def pick_backend(config: TrainerConfig, on_gpu: bool, model_dir: Callable[[], Path]) -> BackendChoice:
    """DDP or DeepSpeed: the spec decides, or for `auto` on several GPUs, the model's size against
    the GPU's memory (the model is fetched first; every rank reaches the same answer)."""

    def sizes() -> tuple[int, int]:
        state = model_mod.ddp_state_bytes(config.spec, model_dir(), on_gpu)
        return state, torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory

    return choose_backend(config.spec, on_gpu, sizes)


class Trainer:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.spec = config.spec
        self.state = TrainState()
        self.progress = ProgressState()
        self.stop_requested = False
        self.stop_signal = 0  # the first of SIGTERM, SIGINT or SIGHUP this rank saw
        self.server: Any = None
        self.metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        spec = self.spec
        self.started = time.time()
        on_gpu = torch.cuda.is_available()
        self.model_path: Path | None = None
        self.backend = pick_backend(self.config, on_gpu, self._model_dir)
        self.accelerator = acc = build_accelerator(self.config, self.backend.deepspeed)
        signals.stop_at_next_step(self._on_sigterm)  # SIGTERM, SIGINT and SIGHUP: checkpoint at the next step
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.world_size != self.config.world_size:
            raise TrainerError(
                ExitCode.CONFIG_INVALID,
                f"torchrun started {self.world_size} processes but the config expects worldSize {self.config.world_size}",
            )
        if acc.is_main_process:
            self.server = serve(self.progress, self.config.progress_port)
            log(f"progress on :{self.server.server_address[1]}/progress; world size {self.world_size}; {acc.distributed_type}")
            log(f"backend {self.backend.name}: {self.backend.reason}")
        set_seed(spec.training.seed)
        self.store = OutputStore(spec.output.uri, spec.storage)
        if acc.is_main_process:
            self.store.check_writable()
        self.done = self.store.exists(COMPLETE_MARKER)
        if self.done:
            if acc.is_main_process:
                log(f"{self.store.uri} already holds complete artifacts; nothing to do")
            return
        model_path = self._model_dir()
        self.tokenizer = model_mod.load_tokenizer(model_path, spec.model.trust_remote_code)
        pad = self.tokenizer.pad_token_id
        train: Any
        evals: Any
        if spec.objective == "dpo":
            train, evals = dpo_mod.load_pairs(spec.dataset, spec.storage, self.tokenizer, spec.training.seed)
            self.gen_examples = []
            collate: Callable[[Any], dict[str, torch.Tensor]] = functools.partial(dpo_mod.collate_pairs, pad_id=pad)
        else:
            train, evals, self.gen_examples, self.metrics["data"] = data_mod.load_examples(spec.dataset, spec.storage, self.tokenizer, spec.training.seed)
            collate = functools.partial(data_mod.collate, pad_id=pad, packed=spec.dataset.packing)
        data_mod.check_batch(len(train), spec.training, self.world_size, self.config.gradient_accumulation_steps)
        if acc.is_main_process:
            log(f"{len(train)} training and {len(evals)} evaluation {'preference pairs' if spec.objective == 'dpo' else 'sequences'}")
            if "data" in self.metrics:
                for line in data_mod.report_lines(self.metrics["data"], spec.dataset):
                    log(line)
                if warning := data_mod.data_warning(self.metrics["data"], spec.dataset):
                    self.progress.update(dataWarning=warning)
                log(preflight.memory_line(spec, model_path, self.metrics["data"]["longest"], on_gpu, self.backend.deepspeed))
            if spec.training.eval_generation_samples and self.gen_examples:
                before = self._exact_match(self._plain_model(model_path))
                self.metrics["exactMatchBefore"] = before
                log(f"exact match before training: {before:.3f}")
        model = model_mod.prepare_model(spec, model_path, on_gpu, self.backend.deepspeed)
        if spec.training.neftune_alpha is not None:
            optim_mod.install_neftune(model, spec.training.neftune_alpha)
        trainable, total = model_mod.trainable_parameters(model)
        if spec.model.quantization is not None:
            # What bitsandbytes really built: its k-bit linear layers under the adapter.
            self.metrics["quantizedLayers"] = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
            if acc.is_main_process:
                log(f"QLoRA: {self.metrics['quantizedLayers']} linear layers at {spec.model.quantization.bits} bits ({spec.model.quantization.type if spec.model.quantization.bits == 4 else 'int8'})")
        self.metrics["chunkedLoss"] = loss_mod.installed(model)
        self.metrics["fastPath"] = model_mod.fast_path(model)
        if acc.is_main_process:
            log(f"method {spec.method}: {trainable:,} of {total:,} parameters trainable; fast path {self.metrics['fastPath']}")
            if self.metrics["chunkedLoss"]:
                log("loss: chunked linear + cross-entropy (no full logits)")
            else:
                log(f"loss: the model's own ({loss_mod.supported(model) or 'off under ZeRO-3, or KUBETUNE_CHUNKED_LOSS=0'})")
        # Parameter groups carry LoRA+, the head's rate and layer-wise decay (one group when none is set).
        groups = optim_mod.param_groups(model, spec)
        if acc.is_main_process and len(groups) > 1:
            log("learning rates: " + ", ".join(f"{len(g['params'])} tensors at {g['lr']:.2e}" for g in groups))
        # One fused kernel per step on CUDA under DDP; DeepSpeed manages (and may offload) the state itself.
        # KUBETUNE_FUSED_ADAMW=1 forces it on the CPU too (tests of the on-device skip), 0 turns it off.
        fused = os.environ.get(ENV_FUSED_ADAMW, "1" if on_gpu else "0") == "1" and not self.backend.deepspeed
        optimizer = torch.optim.AdamW(groups, lr=spec.training.learning_rate, weight_decay=spec.training.weight_decay, fused=fused or None)
        workers = LOADER_WORKERS_GPU if on_gpu else 0
        loader_args: dict[str, Any] = {"num_workers": workers, "pin_memory": on_gpu, "persistent_workers": workers > 0}
        generator = torch.Generator().manual_seed(spec.training.seed)
        if self.metrics["fastPath"].get("varlenAttention"):
            # Micro-batches by token budget (perDeviceBatchSize x maxSeqLength), each one flattened row (batching.py).
            budget = spec.training.per_device_batch_size * spec.dataset.max_seq_length
            loader_args.update(batch_size=1, collate_fn=batching.Flatten(spec.dataset.max_seq_length))
            train, evals = batching.micro_batches(train, budget, spec.training.seed), batching.micro_batches(evals, budget)
        else:  # the model's own attention: rows padded to the longest (packed rows carry position_ids), or DPO pairs
            loader_args.update(batch_size=spec.training.per_device_batch_size, collate_fn=collate)
        train_loader: Any = torch.utils.data.DataLoader(cast(Any, train), shuffle=True, generator=generator, **loader_args)
        eval_loader: Any = torch.utils.data.DataLoader(cast(Any, evals), **loader_args) if evals else None
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        self.reference = self._dpo_reference(model_path, on_gpu) if spec.objective == "dpo" else None

        accum = self.config.gradient_accumulation_steps
        self.steps_per_epoch = max(1, len(self.train_loader) // accum)
        t = spec.training
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * self.total_steps)
        # Stepped by hand once per optimizer step (not through accelerate, which scales by world size).
        self.scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        acc.register_for_checkpointing(self.scheduler)
        self._resume()
        if self.eval_loader is not None and self.state.step == 0:
            self.metrics["evalLossBefore"] = self.evaluate()
            self.metrics.update({f"{k}Before": v for k, v in self.eval_rewards.items()})
            if acc.is_main_process:
                log(f"eval loss before training: {self.metrics['evalLossBefore']:.4f}")
        self.progress.update(totalSteps=self.total_steps, step=self.state.step, phase="Training")

    def _dpo_reference(self, model_path: Path, on_gpu: bool) -> Any:
        """The reference policy: the adapters-off base (adapter methods), a frozen copy (full), or None."""
        spec, dpo = self.spec, self.spec.dpo or DpoSpec()
        copy = None
        if dpo.reference_model == "frozen-copy" and not methods.is_adapter(spec):
            with model_mod.no_zero3_init():  # a whole copy per rank, outside ZeRO-3's partitioning
                dtype = model_mod.resolve_dtype(spec.model.dtype, on_gpu)
                copy = model_mod.load_model(model_path, dtype, spec.model.trust_remote_code).to(self.accelerator.device).eval()
            copy.requires_grad_(False)
        if self.accelerator.is_main_process:
            kind = "none (reference-free)" if dpo.reference_model == "none" else ("the base with adapters off" if copy is None else "a frozen copy")
            log(f"objective dpo ({dpo.loss_type}, beta {dpo.beta}); reference: {kind}")
        return dpo_mod.reference_for(methods.is_adapter(spec), dpo, self.accelerator.unwrap_model(self.model), copy)

    def _loss(self, model: Any, batch: dict[str, Any], stats: torch.Tensor | None, denominator: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's loss on one micro-batch; DPO adds its reward statistics to `stats`. For the language-model
        loss, `denominator` makes it the micro-batch's token sum over the step's share of tokens (steps.py)."""
        if self.spec.objective == "dpo":
            out = dpo_mod.dpo_forward(model, self.reference, batch, self.spec.dpo or DpoSpec())
            if stats is not None:
                stats += out.stats()
            return out.loss
        if denominator is not None:
            return model(**batch, num_items_in_batch=denominator, use_cache=False).loss
        return model(**batch, use_cache=False).loss

    def _model_dir(self) -> Path:
        if self.model_path is None:
            self.model_path = model_mod.model_path(self.spec)
        return self.model_path

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.stop_signal = self.stop_signal or signum

    def stop_reason(self) -> str:
        return signals.signal_name(self.stop_signal) if self.stop_signal else "a peer's stop request"

    def _plain_model(self, path: Path) -> Any:
        with model_mod.no_zero3_init():
            return model_mod.load_model(path, torch.float32, self.spec.model.trust_remote_code).eval()

    # ------------------------------------------------------------------ resume

    def _resume(self) -> None:
        store = self.store
        steps = ckpt.complete_checkpoints(store)
        if not steps and self.config.resume_from:  # a new run that continues the previous one
            store = OutputStore(self.config.resume_from, self.spec.storage)
            steps = ckpt.complete_checkpoints(store)
        if not steps:
            return
        step = steps[-1]
        local = self._local_checkpoint_dir(step)
        # The first process on each node fetches; the others wait at the barrier.
        if self.accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
            store.get_dir(ckpt.checkpoint_rel(step), local)
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(local / "accelerate"))
        saved = json.loads((local / "trainer_state.json").read_text())
        self.state = TrainState(**saved)
        origin = "" if store is self.store else f" of {store.uri}"
        log(f"resumed from checkpoint step {step}{origin} (epoch {self.state.epoch}, batch {self.state.batches_in_epoch})")

    def _local_checkpoint_dir(self, step: int) -> Path:
        return cache_root() / "checkpoints" / (self.config.job.uid or self.config.job.name) / ckpt.checkpoint_rel(step)

    # ------------------------------------------------------------------ train

    def _raise_if_bad(self, step_flags: torch.Tensor, bad_loss: torch.Tensor, step: int) -> bool:
        """Read the flags back (a host sync); raise on a non-finite loss; True when a SIGTERM was seen."""
        bad, stop = (v > 0 for v in step_flags.tolist())
        if bad:
            raise TrainerError(
                ExitCode.LOSS_NOT_FINITE,
                f"loss became {bad_loss.item()} at step {step}; lower spec.training.learningRate or check the data. "
                "The last good checkpoint is kept.",
            )
        return stop

    def train(self) -> ExitCode:
        acc, spec, st = self.accelerator, self.spec, self.state
        device = acc.device
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        window_loss, window_n, window_tokens, window_inputs, window_start = zero(), 0, zero(), zero(), time.time()
        window_pref = torch.zeros(5, device=device)  # DPO: pairs, ranked right, margin, chosen and rejected reward sums
        nonfinite, bad_loss = zero(), zero()
        preempted = stopped_early = stop = False
        debug_stop_at = int(os.environ.get(ENV_DEBUG_STOP_AT_STEP, "0"))  # tests: act as if SIGTERM came at this step
        accum = self.config.gradient_accumulation_steps
        token_weighted = spec.objective != "dpo"  # DPO weighs pairs, each micro-batch's mean as before
        deferred = steps.skips_on_device(self.optimizer)  # flags read one step late; the fused optimizer skips a bad step
        pending: torch.Tensor | None = None  # the previous step's flags, not yet read
        clip = spec.training.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED"
        self.model.train()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        deadline = spec.run_policy.progress_deadline_seconds
        dog = watchdog.Watchdog(deadline, watchdog.exit_stalled).start() if deadline else None
        while st.step < self.total_steps and not (preempted or stopped_early):
            self.train_loader.set_epoch(st.epoch)
            loader = acc.skip_first_batches(self.train_loader, st.batches_in_epoch) if st.batches_in_epoch else self.train_loader
            for group in steps.optimizer_steps(loader, accum):
                denominator = steps.step_denominator(group, self.world_size, accum, device) if token_weighted else None
                losses = steps.forward_backward(acc, self.model, group, functools.partial(self._loss, self.model, stats=window_pref, denominator=denominator))
                for batch, detached in zip(group, losses, strict=True):
                    finite = torch.isfinite(detached)
                    nonfinite += (~finite).float()
                    bad_loss = torch.where(finite, bad_loss, detached)
                    window_loss += torch.nan_to_num(detached)
                    window_n += 1
                    if "labels" in batch:
                        window_tokens += batching.label_count(batch)
                        window_inputs += batch["input_ids"].numel()
                st.batches_in_epoch += len(group)
                step_flags = steps.flags(nonfinite, self.stop_requested)
                if pending is not None:  # the previous step's flags: long done on the device by now
                    stop = self._raise_if_bad(pending, bad_loss, st.step) or stop
                    pending = None
                if deferred:
                    steps.set_found_inf(self.optimizer, step_flags)
                    pending = step_flags
                else:  # checked before the update, so a non-finite loss never reaches the weights
                    stop = self._raise_if_bad(step_flags, bad_loss, st.step + 1) or stop
                if clip:
                    acc.clip_grad_norm_(self.model.parameters(), spec.training.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.scheduler.step()
                st.step += 1
                watchdog.debug_hang(st.step, rank)
                if dog is not None:
                    dog.beat(st.step)
                logging_step = st.step % spec.training.logging_steps == 0 or st.step == self.total_steps
                eval_step = self.eval_loader is not None and bool(spec.training.eval_steps) and st.step % spec.training.eval_steps == 0
                checkpoint_step = st.step % spec.output.checkpoint_steps == 0 or st.step == debug_stop_at
                if pending is not None and (logging_step or eval_step or checkpoint_step or st.step >= self.total_steps):
                    stop = self._raise_if_bad(pending, bad_loss, st.step) or stop  # never log, evaluate or save a bad step
                    pending = None
                if logging_step:
                    window = torch.stack([window_loss / max(window_n, 1), window_tokens.float(), window_inputs.float()])
                    stats = acc.reduce(torch.cat([window, window_pref]), "sum").tolist()
                    elapsed = time.time() - window_start
                    mean_loss = stats[0] / self.world_size
                    tps = stats[1] / max(elapsed, 1e-9)
                    st.tokens_seen += int(stats[1])
                    st.train_seconds += elapsed
                    self._report(mean_loss, tps, dpo_mod.reward_summary(stats[3:]) if spec.objective == "dpo" else {}, int(stats[2]))
                    window_loss, window_n, window_tokens, window_inputs, window_start = zero(), 0, zero(), zero(), time.time()
                    window_pref.zero_()
                if eval_step:
                    stopped_early = self._evaluate_and_check()
                preempted = stop or st.step == debug_stop_at
                if preempted or checkpoint_step:
                    self.save_checkpoint()
                if preempted or stopped_early or st.step >= self.total_steps:
                    break
            else:
                st.epoch += 1
                st.batches_in_epoch = 0
                if self.eval_loader is not None and not spec.training.eval_steps:
                    stopped_early = self._evaluate_and_check()
        if pending is not None:
            self._raise_if_bad(pending, bad_loss, st.step)
        steps.set_found_inf(self.optimizer, None)
        if dog is not None:
            dog.stop()
        if preempted:
            log(f"{self.stop_reason()}: checkpoint written at step {st.step}; exiting for a restart")
            return ExitCode.PREEMPTED
        if self.eval_loader is not None and (not st.evals or st.evals[-1]["step"] != st.step):
            self._evaluate_and_check()
        if os.environ.get(ENV_DEBUG_DIR):
            self._dump_rank_state(Path(os.environ[ENV_DEBUG_DIR]))
        return ExitCode.OK

    def _dump_rank_state(self, directory: Path) -> None:
        """Tests: each rank records the world size torch.distributed saw and a digest of its trained weights."""
        import hashlib

        params = [p for p in self.model.parameters() if p.requires_grad]
        gather: Any = contextlib.nullcontext()
        if self.accelerator.distributed_type.value == "DEEPSPEED" and self.config.deepspeed and self.spec.distributed.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params)
        with gather:
            digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes() for p in params)).hexdigest()
            norm = float(sum(p.detach().float().norm() ** 2 for p in params) ** 0.5)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "worldSize": self.world_size, "distributedType": str(self.accelerator.distributed_type),
                        "acceleratorProcesses": self.accelerator.num_processes, "digest": digest, "norm": norm,
                        "lossCurve": self.state.loss_curve})
        )

    def _report(self, loss: float, tps: float, rewards: dict[str, float], input_tokens: int = 0) -> None:
        st = self.state
        lr = max(self.scheduler.get_last_lr())  # the base rate (head and LoRA+ groups may be higher, decayed layers lower)
        # inputTokens: tokens the model ran on since the last report, all ranks (padding-free batches compute no padding).
        st.loss_curve.append({"step": st.step, "loss": loss, "learningRate": lr, "tokensPerSecond": tps, "inputTokens": input_tokens, **rewards})
        per_step = st.train_seconds / max(st.step, 1)
        eta = per_step * (self.total_steps - st.step)
        epoch = st.epoch + st.batches_in_epoch / max(len(self.train_loader), 1)
        self.progress.update(step=st.step, loss=loss, learningRate=lr, tokensPerSecond=tps, etaSeconds=eta, epoch=round(epoch, 4),
                             **{k: v for k, v in rewards.items() if k in ("rewardAccuracy", "rewardMargin")})
        if self.accelerator.is_main_process:
            extra = "".join(f" {k} {v:.3f}" for k, v in rewards.items())
            log(f"step {st.step}/{self.total_steps} loss {loss:.4f}{extra} lr {lr:.2e} tokens/s {tps:.0f} eta {eta:.0f}s")

    @torch.no_grad()
    def evaluate(self) -> float:
        acc = self.accelerator
        assert self.eval_loader is not None
        self.progress.update(phase="Evaluating")
        self.model.eval()
        total = torch.zeros(2, device=acc.device)
        pref = torch.zeros(5, device=acc.device)
        for batch in self.eval_loader:
            if self.spec.objective == "dpo":  # weighted by pairs
                before = pref[0].clone()
                loss = self._loss(self.model, batch, pref)
                n = pref[0] - before
            else:
                loss = self._loss(self.model, batch, None)
                n = (batch["labels"][:, 1:] != data_mod.IGNORE).sum()
            total += torch.stack([loss.detach().float() * n, n.float()])
        total, pref = acc.reduce(total, "sum"), acc.reduce(pref, "sum")
        self.eval_rewards = {f"eval{k[0].upper()}{k[1:]}": v for k, v in dpo_mod.reward_summary(pref.tolist()).items()} if self.spec.objective == "dpo" else {}
        self.model.train()
        self.progress.update(phase="Training")
        return float(total[0] / total[1].clamp(min=1))

    def _evaluate_and_check(self) -> bool:
        """Evaluate; True when early stopping says stop."""
        st, es = self.state, self.spec.training.early_stopping
        loss = self.evaluate()
        st.evals.append({"step": st.step, "evalLoss": loss, **self.eval_rewards})
        self.progress.update(evalLoss=loss)
        if self.accelerator.is_main_process:
            log(f"step {st.step} eval loss {loss:.4f}")
        if st.best_eval is None or loss < st.best_eval - (es.min_delta if es else 0.0):
            st.best_eval, st.evals_without_improvement = loss, 0
        else:
            st.evals_without_improvement += 1
        if es and st.evals_without_improvement >= es.patience:
            if self.accelerator.is_main_process:
                log(f"early stopping: eval loss has not improved for {es.patience} evaluations")
            return True
        return False

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        acc, step = self.accelerator, self.state.step
        self.progress.update(phase="Saving")
        local = self._local_checkpoint_dir(step)
        if acc.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(local / "accelerate"))
        if acc.is_main_process:
            (local / "trainer_state.json").write_text(json.dumps(vars(self.state)))
        acc.wait_for_everyone()
        # Each node uploads what its ranks wrote; rank 0 seals once every node is done.
        files = ckpt.file_table(local) if acc.is_local_main_process else {}
        if acc.is_local_main_process:
            ckpt.upload_files(self.store, local, ckpt.checkpoint_rel(step), files)
        gathered: list[Any] = [None] * self.world_size
        if self.world_size > 1:
            torch.distributed.all_gather_object(gathered, files)
        else:
            gathered = [files]
        if acc.is_main_process:
            merged = {k: v for part in gathered for k, v in (part or {}).items()}
            ckpt.seal(self.store, ckpt.checkpoint_rel(step), merged, {"step": step})
            ckpt.prune_checkpoints(self.store, self.spec.output.keep_checkpoints)
            log(f"checkpoint step {step} -> {self.store.url(ckpt.checkpoint_rel(step))}")
        acc.wait_for_everyone()
        self.progress.update(phase="Training")

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        """Final artifacts: adapter/, model/, metrics.json, trainer-config.yaml, manifest.json, COMPLETE last."""
        acc, spec = self.accelerator, self.spec
        self.progress.update(phase="Saving")
        state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 shards; every rank must call it
        if acc.is_main_process:
            out = Path(tempfile.mkdtemp(prefix="kubetune-artifacts-", dir=cache_root()))
            unwrapped = acc.unwrap_model(self.model)
            if methods.is_adapter(spec):
                unwrapped.save_pretrained(out / ADAPTER_DIR, state_dict=state_dict)
                self.tokenizer.save_pretrained(out / ADAPTER_DIR)
                if methods.merges_adapter(spec):
                    from peft import PeftModel

                    with model_mod.no_zero3_init():
                        dtype = model_mod.resolve_dtype(spec.model.dtype, torch.cuda.is_available())
                        # QLoRA too: the adapter is merged into the base loaded unquantized (de-quantized weights).
                        base = model_mod.load_model(self._model_dir(), dtype, spec.model.trust_remote_code)
                        merged = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).merge_and_unload()
                    merged.save_pretrained(out / MERGED_DIR, safe_serialization=True)
                    self.tokenizer.save_pretrained(out / MERGED_DIR)
                    if spec.model.quantization is not None:
                        q = spec.model.quantization
                        self.metrics["mergedModel"] = (
                            f"de-quantized: the adapter (trained on the {q.bits}-bit {q.type if q.bits == 4 else 'int8'} base) "
                            f"merged into the original {str(dtype).removeprefix('torch.')} weights"
                        )
                        log(f"merged model: {self.metrics['mergedModel']}")
            else:
                unwrapped.save_pretrained(out / MERGED_DIR, state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(out / MERGED_DIR)
            self._final_metrics(out)
            (out / CONFIG_FILE).write_text(self.config.dump_yaml())
            files = ckpt.file_table(out)
            ckpt.upload_files(self.store, out, "", files)
            ckpt.seal(self.store, "", files, {"job": self.config.job.name, "step": self.state.step})
            shutil.rmtree(out, ignore_errors=True)
            log(f"artifacts -> {self.store.uri} ({len(files)} files)")
        acc.wait_for_everyone()
        self.progress.update(phase="Succeeded")

    def _final_metrics(self, out: Path) -> None:
        st = self.state
        if self.spec.training.eval_generation_samples and self.gen_examples:
            if (out / MERGED_DIR).exists():
                tuned = self._plain_model(out / MERGED_DIR)
            else:
                from peft import PeftModel

                with model_mod.no_zero3_init():
                    tuned = PeftModel.from_pretrained(self._plain_model(self._model_dir()), str(out / ADAPTER_DIR)).eval()
            self.metrics["exactMatchAfter"] = self._exact_match(tuned)
            log(f"exact match after training: {self.metrics['exactMatchAfter']:.3f} (before {self.metrics.get('exactMatchBefore', 0):.3f})")
        metrics = {
            "job": self.config.job.name,
            "steps": st.step,
            "totalSteps": self.total_steps,
            "worldSize": self.world_size,
            "backend": self.backend.name,
            "backendReason": self.backend.reason,
            "lossCurve": st.loss_curve,
            "evals": st.evals,
            "evalLossBefore": self.metrics.get("evalLossBefore"),
            "evalLossAfter": st.evals[-1]["evalLoss"] if st.evals else None,
            "objective": self.spec.objective,
            **({k: st.loss_curve[-1][k] for k in ("rewardAccuracy", "rewardMargin")} if self.spec.objective == "dpo" and st.loss_curve else {}),
            **({f"{k}After": v for k, v in st.evals[-1].items() if k.startswith("evalReward")} if st.evals else {}),
            "tokensSeen": st.tokens_seen,
            "tokensPerSecond": st.tokens_seen / st.train_seconds if st.train_seconds else None,
            "trainSeconds": st.train_seconds,
            "wallSeconds": time.time() - self.started,
            **{k: v for k, v in self.metrics.items() if k != "evalLossBefore"},
        }
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        self.final_metrics = metrics

    @torch.no_grad()
    def _exact_match(self, model: Any) -> float:
        """Greedy answers to held-out prompts compared token for token with the reference response."""
        samples = self.gen_examples[: self.spec.training.eval_generation_samples]
        hits = 0
        for prompt, reference in samples:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=len(reference),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            eos = self.tokenizer.eos_token_id
            hits += data_mod.upto_eos(out[0, len(prompt) :].tolist(), eos) == data_mod.upto_eos(reference, eos)
        return hits / max(len(samples), 1)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
