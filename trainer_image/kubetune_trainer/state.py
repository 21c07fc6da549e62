"""What a checkpoint carries besides Accelerate's state, and the run's one-off measurements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.api.models import EvaluationResult


@dataclass
class TrainState:
    """Where training is and what it has seen; saved as trainer_state.json in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in `epoch` (data position)
    best_eval: float | None = None
    evals_without_improvement: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)  # figures measured before the first step (evalLossBefore, ...): a resume keeps them


@dataclass
class RunFacts:
    """Measured once per run (not per step) and written to metrics.json."""

    chunked_loss: bool = False
    eval_loss_before: float | None = None
    exact_match_before: float | None = None
    exact_match_after: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the data report: sources, formats, counts, overflow
    eval_rewards_before: dict[str, float] = field(default_factory=dict)  # DPO: evalReward*Before
    merged_model: str | None = None
    oci: dict[str, str] | None = None  # spec.output.publish: the pushed reference, digest-pinned
    fast_path: dict[str, Any] = field(default_factory=dict)  # which fast kernels the model runs (model.fast_path)
    retain_loss_before: float | None = None  # spec.evaluation.retain scored by the base model
    evaluation: EvaluationResult | None = None  # the final model's figures and gate verdict (gate.passed asks it)
    generations: list[dict[str, Any]] = field(default_factory=list)  # each generation check: prompt, answer, passed
    interpolation: list[dict[str, Any]] = field(default_factory=list)  # WiSE-FT: one row of figures per alpha
    resumed: dict[str, Any] | None = None  # the checkpoint the run continued from, and the config changes a new run applied
    set_aside: list[dict[str, str]] = field(default_factory=list)  # checkpoints that failed verification: where each went, why
    owner: dict[str, Any] = field(default_factory=dict)  # the output's owner record (owner.py)
    inputs: dict[str, str] = field(default_factory=dict)  # each input URI -> the content identity trained on (storage.identity)
    quantized_layers: int | None = None  # QLoRA: the k-bit linear layers bitsandbytes built  # how the merged model was made, when not plainly (QLoRA: de-quantized)
