"""Held-out loss, early stopping, and exact match of greedy answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kubetune.api.contract import TrainerPhase
from kubetune.api.models import FineTuneJobSpec

from kubetune_trainer.data import IGNORE, upto_eos
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
        self.rewards = {f"eval{k[0].upper()}{k[1:]}": v for k, v in reward_fields(pref.tolist(), self.spec).items()}
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
