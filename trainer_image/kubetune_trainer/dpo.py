"""Direct Preference Optimization: preference pairs in, the DPO loss and its reward statistics out.

Self-contained on purpose (the SFT loss may change shape without touching it): records in the
`preference` shape are parsed and tokenized by the dataset code (formats/masking), and each pair is
scored as two whole sequences, prompt + chosen and prompt + rejected, stacked as one batch (chosen rows first),
and a sequence's log-probability is the sum over its reply tokens. The reference is the starting model:
with an adapter method the same weights with the adapter switched off (no second copy), with full
fine-tuning a frozen copy, or nothing (`referenceModel: none`). The loss follows TRL's DPOTrainer
(`tests/trainer/test_dpo.py` checks it to 1e-5 on the same batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, DpoSpec, FieldMapping

from kubetune_trainer.data import SourceReport
from kubetune_trainer.errors import TrainerError

IGNORE = -100


# ------------------------------------------------------------------- data


@dataclass
class PairExample:
    """A preference pair as two token sequences (same prompt), each with its reply labelled."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def _learns(labels: list[int]) -> bool:
    return any(label != IGNORE for label in labels[1:])


def truncate(pair: PairExample, max_len: int) -> PairExample | None:
    """Cut both sequences at max_len; None when either reply lost every token."""
    out = PairExample(
        pair.chosen_ids[:max_len],
        pair.chosen_labels[:max_len],
        pair.rejected_ids[:max_len],
        pair.rejected_labels[:max_len],
    )
    return out if _learns(out.chosen_labels) and _learns(out.rejected_labels) else None


def tokenize_source_pairs(
    path: Any, label: str, fmt: str, fields: FieldMapping, spec: DatasetSpec, tokenizer: Any
) -> list[PairExample]:
    return source_pairs(path, label, fmt, fields, spec, tokenizer)[0]


def source_pairs(
    path: Any, label: str, fmt: str, fields: FieldMapping, spec: DatasetSpec, tokenizer: Any
) -> tuple[list[PairExample], SourceReport]:
    """Every preference record of one dataset (explicit or implicit prompt, text or conversational: formats.py),
    tokenized as TRL does, overflow applied; refuses with the reason and the first records' places."""
    from kubetune_trainer.data import valid_samples
    from kubetune_trainer.masking import tokenize_preference

    report = SourceReport(label)
    pairs: list[PairExample] = []
    for where, sample in valid_samples(path, fmt, fields, spec, report, objective="dpo"):
        (c_ids, c_labels), (r_ids, r_labels) = tokenize_preference(sample, tokenizer, where)
        pair = _fit_pair(PairExample(c_ids, c_labels, r_ids, r_labels), spec, where, report)
        if pair is not None:
            pairs.append(pair)
            report.tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
    _check_pairs(pairs, report, label, spec)
    return pairs, report


def _check_pairs(pairs: list[PairExample], report: SourceReport, label: str, spec: DatasetSpec) -> None:
    """Refuse a source with too many invalid records (the reasons, counts and first places) or no pair left."""
    from kubetune_trainer.records import refuse

    report.examples = len(pairs)
    if sum(report.invalid.values()) > spec.max_invalid_fraction * report.records:
        from kubetune_trainer.data import _check_source

        _check_source(report, [], label, spec)
    if not pairs:
        longest = max(report.lengths, default=0)
        raise refuse(
            f"no preference pair in {label} keeps a reply within spec.dataset.maxSeqLength {spec.max_seq_length}: {report.dropped} of "
            f"{report.records} pairs lost every reply token (overflow {spec.overflow}; longest pair {longest} tokens); raise maxSeqLength"
        )


def _fit_pair(
    pair: PairExample, spec: DatasetSpec, where: object, report: SourceReport
) -> PairExample | None:
    """spec.dataset.overflow applied to a pair by its longer sequence (counted in `report`); None when dropped."""
    from kubetune_trainer.records import refuse

    limit = spec.max_seq_length
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    report.lengths.append(longest)
    if longest <= limit:
        return pair
    if spec.overflow == "error":
        raise refuse(f"{where}: the pair is {longest} tokens (prompt + longer reply), more than spec.dataset.maxSeqLength {limit}; "
                     "raise maxSeqLength, or set spec.dataset.overflow: truncate (or drop)")  # fmt: skip
    if spec.overflow == "truncate" and (cut := truncate(pair, limit)) is not None:
        report.truncated += 1
        report.truncated_tokens += (
            len(pair.chosen_ids) + len(pair.rejected_ids) - len(cut.chosen_ids) - len(cut.rejected_ids)
        )
        return cut
    report.dropped += 1
    report.dropped_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
    return None


def collate_pairs(batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [chosen rows; rejected rows]; labels only on the reply tokens."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in batch] + [
        (p.rejected_ids, p.rejected_labels) for p in batch
    ]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = torch.tensor(row_ids)
        labels[i, :n] = torch.tensor(row_labels)
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
    ref_chosen, ref_rejected = (
        reference.chunk(2)
        if reference is not None
        else (torch.zeros_like(chosen), torch.zeros_like(rejected))
    )
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


def reference_for(
    spec_method_is_adapter: bool, dpo: DpoSpec, unwrapped: Any, frozen_copy: Any | None
) -> Callable[..., Any] | None:
    """How to run the reference model on a batch: the adapters-off policy, a frozen copy, or None."""
    if dpo.reference_model == "none":
        return None
    if spec_method_is_adapter:

        def base(**batch: Any) -> Any:
            with adapters_off(unwrapped):
                return unwrapped(**batch)

        return base
    if frozen_copy is None:
        raise TrainerError(
            ExitCode.CONFIG_INVALID, "spec.dpo.referenceModel: frozen-copy needs the reference model loaded"
        )
    return cast(Callable[..., Any], frozen_copy)


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


def reward_summary(stats: list[float]) -> dict[str, float]:
    """Summed DpoOutput.stats() (over micro-batches and ranks) -> the numbers people read."""
    pairs = max(stats[0], 1.0)
    return {
        "rewardAccuracy": stats[1] / pairs,
        "rewardMargin": stats[2] / pairs,
        "rewardChosen": stats[3] / pairs,
        "rewardRejected": stats[4] / pairs,
    }


def dpo_forward(
    model: Any, reference: Callable[..., Any] | None, batch: dict[str, torch.Tensor], dpo: DpoSpec
) -> DpoOutput:
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


@dataclass
class BuiltPairs:
    train: list[PairExample]
    evals: list[PairExample]
    sources: list[SourceReport]
    eval_source: SourceReport | None


def build_pairs(spec: DatasetSpec, storage: Any, tokenizer: Any, seed: int) -> BuiltPairs:
    """Train and eval preference pairs (eval from `dataset.eval`, else `evalSplit` of each source) and what each dataset gave."""
    import random

    from kubetune_trainer.data import _sources, eval_path

    train: list[PairExample] = []
    evals: list[PairExample] = []
    reports = []
    for path, label, fmt, fields, _weight in _sources(spec, storage):
        pairs, report = source_pairs(path, label, fmt, fields, spec, tokenizer)
        reports.append(report)
        if not spec.eval and spec.eval_split > 0:
            order = list(range(len(pairs)))
            random.Random(seed).shuffle(order)
            held = set(order[: max(1, int(len(pairs) * spec.eval_split))])
            evals += [p for i, p in enumerate(pairs) if i in held]
            pairs = [p for i, p in enumerate(pairs) if i not in held]
        train += pairs
    eval_report = None
    if spec.eval:
        evals, eval_report = source_pairs(
            eval_path(spec, storage), spec.eval, spec.format, spec.fields, spec, tokenizer
        )
    return BuiltPairs(train, evals, reports, eval_report)


def source_line(report: SourceReport) -> str:
    """One dataset's preference pairs for the log: its mapping, counts, what was skipped and what overflowed."""
    invalid = (
        f", {sum(report.invalid.values())} invalid skipped ({', '.join(f'{n} {r}' for r, n in report.invalid.items())})"
        if report.invalid
        else ""
    )
    overflow = (
        f", {report.truncated} truncated and {report.dropped} dropped at maxSeqLength"
        if report.truncated or report.dropped
        else ""
    )
    return f"data {report.path}: {report.mapping}; {report.records} records -> {report.examples} preference pairs{invalid}{overflow}"


def load_pairs(
    spec: DatasetSpec, storage: Any, tokenizer: Any, seed: int
) -> tuple[list[PairExample], list[PairExample]]:
    """Train and eval preference pairs (eval from `dataset.eval`, else `evalSplit` of each source)."""
    built = build_pairs(spec, storage, tokenizer, seed)
    return built.train, built.evals
