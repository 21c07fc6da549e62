"""Held-out loss, early stopping, exact match of greedy answers, one-process scoring and generation checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from kubetune.api.contract import TrainerPhase
from kubetune.api.models import FineTuneJobSpec, GenerationCheck

from kubetune_trainer.data import IGNORE, Example, collate, upto_eos
from kubetune_trainer.log import log
from kubetune_trainer.objective import PREF_STATS, objective_loss, reward_fields
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.state import TrainState


@dataclass
class Evaluator:
    accelerator: Any
    model: Any
    loader: Any
    progress: ProgressState
    spec: FineTuneJobSpec
    reference: Any = None  # DPO's reference policy
    rewards: dict[str, float] = field(default_factory=dict)  # DPO: the last evaluation's evalReward* figures

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the evaluation set, all ranks together: per label token (SFT) or per pair (DPO)."""
        self.progress.update(phase=TrainerPhase.EVALUATING)
        self.model.eval()
        device = self.accelerator.device
        total, pref = torch.zeros(2, device=device), torch.zeros(PREF_STATS, device=device)
        for batch in self.loader:
            before = pref[0].clone()
            loss = objective_loss(self.spec, self.model, self.reference, batch, pref)
            n = pref[0] - before if self.spec.objective == "dpo" else (batch["labels"][:, 1:] != IGNORE).sum()
            total += torch.stack([loss.detach().float() * n, n.float()])
        total, pref = self.accelerator.reduce(total, "sum"), self.accelerator.reduce(pref, "sum")
        self.rewards = {
            f"eval{k[0].upper()}{k[1:]}": v for k, v in reward_fields(pref.tolist(), self.spec).items()
        }
        self.model.train()
        self.progress.update(phase=TrainerPhase.TRAINING)
        return float(total[0] / total[1].clamp(min=1))

    def evaluate_and_check(self, st: TrainState) -> bool:
        """Evaluate, record it in `st`; True when early stopping says stop."""
        es, main = self.spec.training.early_stopping, self.accelerator.is_main_process
        loss = self.loss()
        st.evals.append({"step": st.step, "evalLoss": loss, **self.rewards})
        self.progress.update(eval_loss=loss)
        if main:
            log(f"step {st.step} eval loss {loss:.4f}")
        if st.best_eval is None or loss < st.best_eval - (es.min_delta if es else 0.0):
            st.best_eval, st.evals_without_improvement = loss, 0
        else:
            st.evals_without_improvement += 1
        if es and st.evals_without_improvement >= es.patience:
            if main:
                log(f"early stopping: eval loss has not improved for {es.patience} evaluations")
            return True
        return False


@torch.no_grad()
def exact_match(model: Any, samples: list[tuple[list[int], list[int]]], tokenizer: Any) -> float:
    """Greedy answers to held-out prompts compared token for token with the reference response (up to EOS)."""
    hits, eos = 0, tokenizer.eos_token_id
    for prompt, reference in samples:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=len(reference),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        hits += upto_eos(out[0, len(prompt) :].tolist(), eos) == upto_eos(reference, eos)
    return hits / max(len(samples), 1)


@torch.no_grad()
def score_loss(
    model: Any, examples: list[Example], pad_id: int, packed: bool, batch_size: int = 8
) -> float | None:
    """Mean loss per label token over `examples`, in this process alone (rank 0 scoring a plain model)."""
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, packed)
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
        )
        count += int((target != IGNORE).sum())
    return total / max(count, 1)


def _prompt_ids(tokenizer: Any, check: GenerationCheck) -> list[int]:
    text = check.prompt
    if not check.raw and getattr(tokenizer, "chat_template", None):
        text = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": check.prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generation_checks(model: Any, tokenizer: Any, checks: list[GenerationCheck]) -> list[dict[str, Any]]:
    """Each prompt answered greedily: {prompt, expect, answer, passed}."""
    model.eval()
    out = []
    for check in checks:
        ids = _prompt_ids(tokenizer, check)
        generated = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=check.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        answer = tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True)
        hit = (
            check.expect in answer
            if check.match == "substring"
            else re.search(check.expect, answer) is not None
        )
        out.append({"prompt": check.prompt, "expect": check.expect, "answer": answer, "passed": hit})
    return out
