"""The objective's loss on one micro-batch: the model's own (SFT) or DPO's against its reference."""

from __future__ import annotations

from typing import Any

import torch
from kubetune.api.models import DpoSpec, FineTuneJobSpec

from kubetune_trainer import dpo as dpo_mod

PREF_STATS = 5  # DPO: pairs, ranked right, margin, chosen and rejected reward sums


def objective_loss(
    spec: FineTuneJobSpec, model: Any, reference: Any, batch: dict[str, Any], stats: torch.Tensor | None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The loss to optimise; DPO adds its reward statistics to `stats` (PREF_STATS sums). For the language-model
    loss, `denominator` makes it the micro-batch's token sum over the step's share of tokens (steps.py)."""
    if spec.objective == "dpo":
        out = dpo_mod.dpo_forward(model, reference, batch, spec.dpo or DpoSpec())
        if stats is not None:
            stats += out.stats()
        return out.loss
    if denominator is not None:
        return model(**batch, num_items_in_batch=denominator, use_cache=False).loss  # type: ignore[no-any-return]
    return model(**batch, use_cache=False).loss  # type: ignore[no-any-return]


def reward_fields(stats: list[float], spec: FineTuneJobSpec) -> dict[str, float]:
    """DPO's reward accuracy and margin (camelCase, as metrics.json and the loss curve carry them); {} for SFT."""
    return dpo_mod.reward_summary(stats) if spec.objective == "dpo" else {}
