"""Direct Preference Optimization: preference pairs in, the DPO loss and its reward statistics out.

Self-contained on purpose (the SFT loss may change shape without touching it): each pair is scored as
two whole sequences, prompt + chosen and prompt + rejected, stacked as one batch (chosen rows first),
and a sequence's log-probability is the sum over its reply tokens. The reference is the starting model:
with an adapter method the same weights with the adapter switched off (no second copy), with full
fine-tuning a frozen copy, or nothing (`referenceModel: none`). The loss follows TRL's DPOTrainer
(`tests/trainer/test_dpo.py` checks it to 1e-5 on the same batch).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, DpoSpec

from kubetune_trainer.errors import TrainerError

IGNORE = -100


# ------------------------------------------------------------------- data


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _messages(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, str) and value.startswith("["):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    return None


def _reply(value: Any) -> str:
    """A reply as text: a string, or the assistant message(s) of a conversational reply."""
    messages = _messages(value)
    if messages is None:
        return str(value)
    return "".join(m["content"] for m in messages if m["role"] == "assistant")


def tokenize_pair(record: dict[str, Any], spec: DatasetSpec, tokenizer: Any) -> PairExample:
    """One preference record: {prompt, chosen, rejected} with text or chat messages, or
    {messages, chosen, rejected} (a conversation and two candidate replies). Chat prompts go through
    the chat template; the replies are the tokens the template adds for the assistant turn."""
    f = spec.fields
    try:
        prompt = record[f.messages] if f.messages in record else record[f.prompt]
        chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
    except KeyError as exc:
        raise TrainerError(
            ExitCode.DATASET_INVALID,
            f"objective dpo needs records with '{f.prompt}' (or '{f.messages}'), 'chosen' and 'rejected'; missing {exc}",
        ) from exc
    messages = _messages(prompt)
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise TrainerError(ExitCode.DATASET_INVALID, "chat preference records need a tokenizer with a chat template")
        render = lambda msgs, gen: _ids(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))  # noqa: E731
        prompt_ids = render(messages, True)
        replies = [render([*messages, {"role": "assistant", "content": r}], False)[len(prompt_ids) :] for r in (chosen, rejected)]
        return PairExample(prompt_ids, replies[0], replies[1])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return PairExample(_ids(tokenizer, str(prompt)), _ids(tokenizer, chosen) + eos, _ids(tokenizer, rejected) + eos)


def truncate(pair: PairExample, max_len: int) -> PairExample | None:
    """Fit prompt + longer reply in max_len: cut the prompt's start first (keeping half), then the replies' ends."""
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    prompt = pair.prompt_ids
    if len(prompt) + longest > max_len:
        prompt = prompt[-max(max_len - longest, max_len // 2) :]
    room = max_len - len(prompt)
    if room < 1 or not pair.chosen_ids or not pair.rejected_ids:
        return None
    return PairExample(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room])


def tokenize_pairs(records: list[dict[str, Any]], spec: DatasetSpec, tokenizer: Any) -> list[PairExample]:
    pairs = [truncate(tokenize_pair(r, spec, tokenizer), spec.max_seq_length) for r in records]
    kept = [p for p in pairs if p is not None]
    if not kept:
        raise TrainerError(ExitCode.DATASET_INVALID, f"no preference pair fits maxSeqLength {spec.max_seq_length}")
    return kept


def collate_pairs(batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [chosen rows; rejected rows]; labels only on the reply tokens."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : n] = torch.tensor(reply)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------- loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label_t+1 | <= t) over each row's labelled tokens, and how many there were (fp32).
    Logits may be longer than labels on the left (prompt tuning's virtual tokens): their tail is used."""
    logits = logits[:, -labels.shape[1] :]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def preference_loss(
    policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor, dpo: DpoSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, chosen rewards and rejected rewards from [chosen; rejected] sequence log-probs.

    `reference` None is reference-free (the reference log-probs are taken as 0).
    """
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2) if reference is not None else (torch.zeros_like(chosen), torch.zeros_like(rejected))
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    beta, ls = dpo.beta, dpo.label_smoothing
    if dpo.loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif dpo.loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif dpo.loss_type == "ipo":  # per-token averages, as TRL (and the IPO authors) normalise
        len_chosen, len_rejected = lengths.chunk(2)
        avg = chosen_ratio / len_chosen.clamp(min=1) - rejected_ratio / len_rejected.clamp(min=1)
        loss = (avg - 1 / (2 * beta)) ** 2
    elif dpo.loss_type == "robust":
        loss = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
    else:
        raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.dpo.lossType: unknown {dpo.loss_type}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ------------------------------------------------------------------ model


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The frozen base of a peft model: the reference, with no second copy in memory."""
    with model.disable_adapter():
        yield


def reference_for(spec_method_is_adapter: bool, dpo: DpoSpec, unwrapped: Any, frozen_copy: Any | None) -> Callable[..., Any] | None:
    """How to run the reference model on a batch: the adapters-off policy, a frozen copy, or None."""
    if dpo.reference_model == "none":
        return None
    if spec_method_is_adapter:

        def base(**batch: Any) -> Any:
            with adapters_off(unwrapped):
                return unwrapped(**batch)

        return base
    if frozen_copy is None:
        raise TrainerError(ExitCode.CONFIG_INVALID, "spec.dpo.referenceModel: frozen-copy needs the reference model loaded")
    return frozen_copy


@dataclass
class DpoOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def stats(self) -> torch.Tensor:
        """[pairs, pairs the policy ranks right, sum of margins, sum of chosen rewards, sum of rejected rewards]."""
        margin = self.chosen_rewards - self.rejected_rewards
        return torch.stack(
            [torch.tensor(float(margin.numel()), device=margin.device), (margin > 0).float().sum(), margin.sum(),
             self.chosen_rewards.sum(), self.rejected_rewards.sum()]
        )  # fmt: skip


def dpo_forward(model: Any, reference: Callable[..., Any] | None, batch: dict[str, torch.Tensor], dpo: DpoSpec) -> DpoOutput:
    """The DPO loss of a [chosen; rejected] batch: policy forward with gradients, reference without."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["labels"]
    policy, lengths = sequence_logps(model(**inputs).logits, labels)
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref, _ = sequence_logps(reference(**inputs).logits, labels)
    loss, chosen, rejected = preference_loss(policy, ref, lengths, dpo)
    return DpoOutput(loss.mean(), chosen, rejected)
