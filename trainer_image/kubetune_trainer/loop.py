"""The step loop: micro-batches -> optimizer steps, with logging, evaluation, checkpoints and stops.

One host sync per optimizer step (the ranks agree on a non-finite loss, on SIGTERM and on a checkpoint
request that reached rank 0's progress server: every rank acts at the same step);
losses and token counts stay on the device until a logging step.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from kubetune.api.contract import ExitCode, TrainerPhase
from kubetune.api.models import CheckpointRecord, FineTuneJobSpec

from kubetune_trainer import batching, signals, steps, watchdog
from kubetune_trainer.checkpoint import Checkpointer, checkpoint_rel
from kubetune_trainer.debug import DebugHooks
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.evaluation import Evaluator
from kubetune_trainer.log import log
from kubetune_trainer.objective import PREF_STATS, objective_loss, reward_fields
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.setup import Parts, Runtime
from kubetune_trainer.state import TrainState
from kubetune_trainer.tracking import Tracker


class Outcome(enum.Enum):
    FINISHED = "finished"  # maxSteps / epochs reached
    EARLY_STOP = "early-stop"  # evaluation stopped improving
    PREEMPTED = "preempted"  # SIGTERM seen by some rank: a checkpoint is written


@dataclass
class StopFlag:
    """Set from the SIGTERM handler; read once per optimizer step."""

    requested: bool = False
    signum: int = 0  # the first of SIGTERM, SIGINT or SIGHUP this rank saw

    def set(self, signum: int = 0, frame: Any = None) -> None:
        self.requested = True
        self.signum = self.signum or signum

    def reason(self) -> str:
        return signals.signal_name(self.signum) if self.signum else "a peer's stop request"


@dataclass
class Window:
    """Loss and label tokens since the last logging step, on the device."""

    loss: torch.Tensor
    tokens: torch.Tensor
    inputs: torch.Tensor  # tokens the model ran on (padding-free batches compute no padding)
    batches: int
    start: float
    pref: torch.Tensor  # DPO's reward statistics (objective.PREF_STATS sums)

    @classmethod
    def open(cls, device: Any) -> Window:
        zero = torch.zeros((), device=device)
        return cls(
            zero.clone(), zero.clone(), zero.clone(), 0, time.time(), torch.zeros(PREF_STATS, device=device)
        )

    def add(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        self.loss += torch.nan_to_num(loss)
        self.batches += 1
        if "labels" in batch:
            self.tokens += batching.label_count(batch)
            self.inputs += batch["input_ids"].numel()


@dataclass
class LossGuard:
    """Counts non-finite micro-batch losses (and keeps the last bad value) without a host sync."""

    nonfinite: torch.Tensor
    bad_loss: torch.Tensor

    @classmethod
    def open(cls, device: Any) -> LossGuard:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def observe(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.nonfinite += (~finite).float()
        self.bad_loss = torch.where(finite, self.bad_loss, loss)


class StepLoop:
    def __init__(self, spec: FineTuneJobSpec, rt: Runtime, parts: Parts, state: TrainState, progress: ProgressState,
                 stop: StopFlag, hooks: DebugHooks, evaluator: Evaluator | None, checkpointer: Checkpointer,
                 tracker: Tracker | None = None):  # fmt: skip
        self.spec, self.rt, self.parts, self.state, self.progress = spec, rt, parts, state, progress
        self.stop, self.hooks, self.evaluator, self.checkpointer = stop, hooks, evaluator, checkpointer
        self.tracker = tracker  # rank 0 with spec.tracking: handed each logged point (never blocks)
        self.acc = rt.accelerator
        self.model = parts.model
        device = self.acc.device
        self.window = Window.open(device)
        self.guard = LossGuard.open(device)
        self.stop_agreed = False  # some rank saw SIGTERM, as of the flags read last
        self.checkpoint_agreed = (
            False  # rank 0 was asked for a checkpoint (POST /checkpoint), as of the flags read last
        )
        self.saved_step = -1  # the step of the checkpoint written last: a step is never written twice
        self.accumulation = max(1, int(self.acc.gradient_accumulation_steps))
        self.deferred = steps.skips_on_device(
            parts.optimizer
        )  # flags read one step late; fused AdamW skips a bad step
        self.pending: torch.Tensor | None = None  # the previous step's flags, not yet read
        self.dog: watchdog.Watchdog | None = (
            None  # the hang watchdog while run() runs (progressDeadlineSeconds)
        )
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def run(self) -> Outcome:
        self.model.train()
        outcome: Outcome | None = None
        deadline = self.spec.run_policy.progress_deadline_seconds
        self.dog = watchdog.Watchdog(deadline, watchdog.exit_stalled).start() if deadline else None
        try:
            while self.state.step < self.parts.total_steps and outcome is None:
                outcome = self._epoch()
            if self.pending is not None:
                self._check_flags(self.pending, self.state.step)
        finally:
            steps.set_found_inf(self.parts.optimizer, None)
            if self.dog is not None:
                self.dog.stop()
        return outcome or Outcome.FINISHED

    def _epoch(self) -> Outcome | None:
        """Train from the saved data position to the end of the epoch (or until a stop)."""
        st, loader = self.state, self.parts.train_loader
        loader.set_epoch(st.epoch)
        if st.batches_in_epoch:
            loader = self.acc.skip_first_batches(loader, st.batches_in_epoch)
        for group in steps.optimizer_steps(loader, self.accumulation):
            self._forward_backward(group)
            outcome = self._optimizer_step()
            if outcome is not None or st.step >= self.parts.total_steps:
                return outcome
        st.epoch += 1
        st.batches_in_epoch = 0
        stop = bool(
            self.evaluator is not None
            and not self.spec.training.eval_steps
            and self.evaluator.evaluate_and_check(st)
        )
        if self.tracker is not None:
            self.tracker.observe(st)
        return Outcome.EARLY_STOP if stop else None

    def _forward_backward(self, group: list[dict[str, Any]]) -> None:
        """One optimizer step's micro-batches: losses token-weighted over the step (steps.py), gradients synced after the last."""
        token_weighted = self.spec.objective != "dpo"  # DPO weighs pairs, each micro-batch's mean
        denominator = (
            steps.step_denominator(group, self.rt.world_size, self.accumulation, self.acc.device)
            if token_weighted
            else None
        )
        loss_of = functools.partial(
            objective_loss,
            self.spec,
            self.model,
            self.parts.reference,
            stats=self.window.pref,
            denominator=denominator,
        )
        losses = steps.forward_backward(self.acc, self.model, group, loss_of)
        for batch, detached in zip(group, losses, strict=True):
            self.guard.observe(detached)
            self.window.add(detached, batch)
        self.hooks.record_seen(self.rank, self.state.epoch, self.state.step + 1, group)
        self.state.batches_in_epoch += len(group)

    def _check_flags(self, step_flags: torch.Tensor, step: int) -> None:
        """Read the flags back (a host sync); raise on a non-finite loss; remember a SIGTERM."""
        bad, stop, checkpoint = (v > 0 for v in step_flags.tolist())
        if bad:
            raise TrainerError(
                ExitCode.LOSS_NOT_FINITE,
                f"loss became {self.guard.bad_loss.item()} at step {step}; lower spec.training.learningRate "
                "or check the data. The last good checkpoint is kept.",
            )
        self.stop_agreed = self.stop_agreed or stop
        self.checkpoint_agreed = self.checkpoint_agreed or checkpoint

    def _update(self) -> None:
        """Flags, then the update. Where fused AdamW skips a bad step on the device, the flags are read one
        step late; elsewhere before the update, so a non-finite loss never reaches the weights."""
        asked = self.rt.is_main and self.progress.checkpoint_asked() > (
            self.progress.report().checkpoint_requests or 0
        )
        step_flags = steps.flags(self.guard.nonfinite, self.stop.requested, asked)
        if self.pending is not None:  # the previous step's flags: long done on the device by now
            self._check_flags(self.pending, self.state.step)
            self.pending = None
        if self.deferred:
            steps.set_found_inf(self.parts.optimizer, step_flags)
            self.pending = step_flags
        else:
            self._check_flags(step_flags, self.state.step + 1)
        max_norm = self.spec.training.max_grad_norm
        if max_norm > 0 and self.acc.distributed_type.value != "DEEPSPEED":
            self.acc.clip_grad_norm_(self.model.parameters(), max_norm)
        self.parts.optimizer.step()
        self.parts.optimizer.zero_grad()

    def _optimizer_step(self) -> Outcome | None:
        st, t = self.state, self.spec.training
        self._update()
        self.parts.scheduler.step()
        st.step += 1
        self.hooks.hang_if_asked(st.step, self.rank)
        if self.dog is not None:
            self.dog.beat(st.step)
        logging_step = st.step % t.logging_steps == 0 or st.step == self.parts.total_steps
        every = t.eval_steps or 0
        eval_step = self.evaluator is not None and every > 0 and st.step % every == 0
        checkpoint_step = st.step % self.spec.output.checkpoint_steps == 0 or self.hooks.preempt_at(st.step)
        if self.pending is not None and (
            logging_step or eval_step or checkpoint_step or st.step >= self.parts.total_steps
        ):
            self._check_flags(self.pending, st.step)  # never log, evaluate or save a bad step
            self.pending = None
        if logging_step:
            self._close_window()
        stopped_early = bool(
            eval_step and self.evaluator is not None and self.evaluator.evaluate_and_check(st)
        )
        if self.tracker is not None and (logging_step or eval_step):
            self.tracker.observe(st)
        preempted = self.stop_agreed or self.hooks.preempt_at(st.step)
        if preempted or checkpoint_step or self.checkpoint_agreed:
            self.save_checkpoint()
        if preempted:
            return Outcome.PREEMPTED
        return Outcome.EARLY_STOP if stopped_early else None

    def _close_window(self) -> None:
        """Mean loss and tokens/s over the window, all ranks together; then a fresh window."""
        w, st = self.window, self.state
        sums = torch.cat(
            [torch.stack([w.loss / max(w.batches, 1), w.tokens.float(), w.inputs.float()]), w.pref]
        )
        stats = self.acc.reduce(sums, "sum").tolist()
        elapsed = time.time() - w.start
        st.tokens_seen += int(stats[1])
        st.train_seconds += elapsed
        self.report(
            stats[0] / self.rt.world_size,
            stats[1] / max(elapsed, 1e-9),
            reward_fields(stats[3:], self.spec),
            int(stats[2]),
        )
        self.window = Window.open(self.acc.device)

    def report(
        self, loss: float, tps: float, rewards: dict[str, float] | None = None, input_tokens: int = 0
    ) -> None:
        st, total, rewards = self.state, self.parts.total_steps, rewards or {}
        lr = max(
            self.parts.scheduler.get_last_lr()
        )  # the base rate (head and LoRA+ groups may be higher, decayed layers lower)
        # inputTokens: tokens the model ran on since the last report, all ranks (padding-free batches compute no padding).
        st.loss_curve.append(
            {
                "step": st.step,
                "loss": loss,
                "learningRate": lr,
                "tokensPerSecond": tps,
                "inputTokens": input_tokens,
                **rewards,
            }
        )
        eta = st.train_seconds / max(st.step, 1) * (total - st.step)
        epoch = st.epoch + st.batches_in_epoch / max(len(self.parts.train_loader), 1)
        self.progress.update(step=st.step, loss=loss, learning_rate=lr, tokens_per_second=tps, eta_seconds=eta, epoch=round(epoch, 4),
                             reward_accuracy=rewards.get("rewardAccuracy"), reward_margin=rewards.get("rewardMargin"))  # fmt: skip
        if self.rt.is_main:
            extra = "".join(f" {k} {v:.3f}" for k, v in rewards.items())
            log(
                f"step {st.step}/{total} loss {loss:.4f}{extra} lr {lr:.2e} tokens/s {tps:.0f} eta {eta:.0f}s"
            )

    def save_checkpoint(self) -> None:
        """All ranks write the checkpoint of this step, once: a SIGTERM, a schedule and a request that agree on
        one step write it once. Rank 0 then counts the requests received so far as served."""
        step = self.state.step
        self.checkpoint_agreed = False
        if step == self.saved_step:
            return
        asked = self.progress.checkpoint_asked()  # received before this checkpoint began: it serves them
        self.progress.update(phase=TrainerPhase.SAVING)
        self.checkpointer.save(self.state)
        self.saved_step = step
        record = CheckpointRecord(step=step, uri=self.checkpointer.store.url(checkpoint_rel(step)) + "/",
                                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        self.progress.update(phase=TrainerPhase.TRAINING, step=step, last_checkpoint=record)
        self.progress.checkpoint_served(asked)
