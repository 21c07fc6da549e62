"""The gate over the final model's figures, the WiSE-FT weight mix and the choice among mixes. Pure.

Figures are keyed like metrics.json: evalLoss, perplexity, retainLoss, forgetting (percent),
exactMatch, generationPass. The publish step asks `passed()`: a job whose gate failed
publishes nothing (its artifacts are still uploaded, for inspection).
"""

from __future__ import annotations

import math
from typing import Any

from kubetune.api.contract import ExitCode
from kubetune.api.models import EvaluationGate, EvaluationResult

from kubetune_trainer.errors import TrainerError

Figures = dict[str, float | None]
LOWER_IS_BETTER = frozenset({"evalLoss", "perplexity", "retainLoss", "forgetting"})
# (gate field, its camelCase name, the figure it bounds, True for an upper bound)
THRESHOLDS: tuple[tuple[str, str, str, bool], ...] = (
    ("max_eval_loss", "maxEvalLoss", "evalLoss", True),
    ("max_perplexity", "maxPerplexity", "perplexity", True),
    ("min_exact_match", "minExactMatch", "exactMatch", False),
    ("min_generation_pass", "minGenerationPass", "generationPass", False),
    ("max_forgetting_percent", "maxForgettingPercent", "forgetting", True),
)


class GateFailed(TrainerError):
    """The final model missed a threshold: not retryable (training again gives the same model)."""

    def __init__(self, result: EvaluationResult, uri: str):
        super().__init__(
            ExitCode.EVALUATION_GATE_FAILED,
            f"evaluation gate failed: {'; '.join(result.failed_checks)} (figures: {result.summary()}); "
            f"nothing published, artifacts kept at {uri} for inspection",
        )
        self.result = result


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


def forgetting(before: float | None, after: float | None) -> float | None:
    """The retain loss's increase over the base model's, in percent (negative: it improved)."""
    if before is None or after is None or before <= 0:
        return None
    return (after / before - 1.0) * 100.0


def check(gate: EvaluationGate | None, figures: Figures) -> tuple[bool | None, list[str]]:
    """(passed, each missed threshold); (None, []) without a gate. A figure that was not measured misses."""
    if gate is None:
        return None, []
    missed = []
    for attr, name, figure, upper in THRESHOLDS:
        limit = getattr(gate, attr)
        if limit is None:
            continue
        value = figures.get(figure)
        if value is None or math.isnan(value):
            missed.append(f"{figure} not measured (gate {name} {limit:g})")
        elif (value > limit) if upper else (value < limit):
            missed.append(f"{figure} {value:.4g} {'>' if upper else '<'} {name} {limit:g}")
    return not missed, missed


def result(
    figures: Figures, gate: EvaluationGate | None, alpha: float, retain_before: float | None
) -> EvaluationResult:
    passed, missed = check(gate, figures)
    return EvaluationResult(
        eval_loss=figures.get("evalLoss"), perplexity=figures.get("perplexity"), retain_loss_before=retain_before,
        retain_loss_after=figures.get("retainLoss"), forgetting_percent=figures.get("forgetting"),
        exact_match=figures.get("exactMatch"), generation_pass=figures.get("generationPass"),
        alpha=alpha, gate_passed=passed, failed_checks=missed,
    )  # fmt: skip


def passed(evaluation: EvaluationResult | None) -> bool:
    """The publish step's question: True unless a gate was checked and failed."""
    return evaluation is None or evaluation.gate_passed is not False


def mix(base: dict[str, Any], tuned: dict[str, Any], alpha: float) -> dict[str, Any]:
    """WiSE-FT: alpha x fine-tuned + (1 - alpha) x base, tensor by tensor (integer buffers and tensors the
    base lacks are the fine-tuned ones). For a merged LoRA this scales the adapter's delta by alpha."""
    if alpha == 1.0:
        return dict(tuned)
    out = {}
    for key, t in tuned.items():
        b = base.get(key)
        if b is None or not t.is_floating_point() or b.shape != t.shape:
            out[key] = t
        else:
            b = b.to(t.dtype)
            out[key] = b + alpha * (t - b)
    return out


def best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The row with the best `metric` (lower or higher is better by metric); ties go to the larger alpha."""
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        raise TrainerError(
            ExitCode.CONFIG_INVALID,
            f"spec.output.selectMetric: {metric} was not measured for any mix; pick a measured metric",
        )
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    return min(scored, key=lambda r: (sign * r[metric], -r["alpha"]))
