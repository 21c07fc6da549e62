"""What a checkpoint carries besides Accelerate's state, and the run's one-off measurements."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from kubetune.api.models import EvaluationResult

GANG_STARTED: Final = time.time()
"""When this process started: the clock of this gang's share of the run's usage."""


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
    before: dict[str, Any] = field(
        default_factory=dict
    )  # figures measured before the first step (evalLossBefore, ...): a resume keeps them
    earlier_gangs_seconds: float = 0.0  # this run's earlier gangs, each from its start to its last checkpoint
    gang_seconds: float = 0.0  # the gang that wrote this checkpoint, from its start to the checkpoint
    world_size: int = (
        0  # processes of the gang that wrote this checkpoint (0: not recorded, before elastic resume)
    )

    def active_seconds(self) -> float:
        """Seconds this run's gangs have run so far (a gang's time after its last checkpoint is not known here)."""
        return self.earlier_gangs_seconds + (time.time() - GANG_STARTED)

    def at_world_size(self, world_size: int) -> TrainState:
        """The data position for a gang of `world_size` processes: batches_in_epoch counts one rank's micro-batches,
        and the ranks take them in turn, so the same examples consumed are batches x old world / new world."""
        if self.world_size and self.world_size != world_size:
            self.batches_in_epoch = self.batches_in_epoch * self.world_size // world_size
        self.world_size = world_size
        return self

    def resumed(self, same_run: bool) -> TrainState:
        """This state as a new gang starts from it: the checkpoint's gang becomes an earlier one; a checkpoint
        of another run (spec.output.resumeFrom: previous) brings none of its seconds."""
        self.earlier_gangs_seconds = self.earlier_gangs_seconds + self.gang_seconds if same_run else 0.0
        self.gang_seconds = 0.0
        return self


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
    huggingface: str | None = None  # spec.output.publish.huggingface: the repository URL at the pushed commit
    lineage: dict[str, Any] = field(default_factory=dict)  # what made the model (kubetune_trainer.lineage)
    fast_path: dict[str, Any] = field(
        default_factory=dict
    )  # which fast kernels the model runs (model.fast_path)
    retain_loss_before: float | None = None  # spec.evaluation.retain scored by the base model
    evaluation: EvaluationResult | None = (
        None  # the final model's figures and gate verdict (gate.passed asks it)
    )
    generations: list[dict[str, Any]] = field(
        default_factory=list
    )  # each generation check: prompt, answer, passed
    interpolation: list[dict[str, Any]] = field(default_factory=list)  # WiSE-FT: one row of figures per alpha
    resumed: dict[str, Any] | None = (
        None  # the checkpoint the run continued from, and the config changes a new run applied
    )
    set_aside: list[dict[str, str]] = field(
        default_factory=list
    )  # checkpoints that failed verification: where each went, why
    owner: dict[str, Any] = field(default_factory=dict)  # the output's owner record (owner.py)
    quantized_layers: int | None = (
        None  # QLoRA: the k-bit linear layers bitsandbytes built  # how the merged model was made, when not plainly (QLoRA: de-quantized)
    )
