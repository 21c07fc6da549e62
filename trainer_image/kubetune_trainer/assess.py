"""After training, on rank 0: the final model's figures (spec.evaluation), the WiSE-FT mixes
(spec.output.interpolate) with one row of figures each, the mix chosen for model/ (output.select),
and the gate's verdict. Plain models in one process, like exact match: the figures do not depend
on how training was distributed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.contract import INTERPOLATION_DIR, MERGED_DIR
from kubetune.api.trainer_config import TrainerConfig

from kubetune_trainer import gate
from kubetune_trainer import model as model_mod
from kubetune_trainer.evaluation import exact_match, generation_checks, score_loss
from kubetune_trainer.gate import Figures
from kubetune_trainer.log import log
from kubetune_trainer.setup import Parts, Runtime
from kubetune_trainer.state import RunFacts, TrainState


def mix_dir(alpha: float) -> str:
    return f"{INTERPOLATION_DIR}/alpha-{alpha:.2f}"


@dataclass
class Assessment:
    config: TrainerConfig
    rt: Runtime
    parts: Parts
    state: TrainState
    facts: RunFacts
    _mix_state: tuple[dict[str, Any], dict[str, Any]] = field(
        default_factory=lambda: ({}, {}), init=False, repr=False
    )
    """(base, fine-tuned) weights while mixes are made."""

    @property
    def wanted(self) -> bool:
        spec = self.config.spec
        return spec.evaluation is not None or bool(spec.output.interpolate)

    def run(self, out: Path, tuned: Any) -> None:
        """Figures of `tuned` (the fine-tuned model as saved in `out`), the mixes, the verdict -> self.facts."""
        spec, facts = self.config.spec, self.facts
        checks = spec.evaluation.generations if spec.evaluation is not None else []
        figures = self.figures(
            tuned, eval_loss=self.state.evals[-1]["evalLoss"] if self.state.evals else None
        )
        figures["exactMatch"] = facts.exact_match_after
        if checks:
            facts.generations = generation_checks(tuned, self.parts.tokenizer, list(checks))
            figures["generationPass"] = sum(g["passed"] for g in facts.generations) / len(facts.generations)
        alpha = 1.0
        if spec.output.interpolate:
            facts.interpolation = self.interpolate(out, tuned)
            if spec.output.select == "best":
                chosen = gate.best(facts.interpolation, spec.output.select_metric)
                alpha, figures = chosen["alpha"], {k: v for k, v in chosen.items() if k != "alpha"}
                if alpha != 1.0:
                    self.save_mix(out, tuned, alpha, out / MERGED_DIR)
                log(f"output.select best by {spec.output.select_metric}: alpha {alpha:g} -> {MERGED_DIR}/")
        gate_spec = spec.evaluation.gate if spec.evaluation is not None else None
        facts.evaluation = gate.result(figures, gate_spec, alpha, facts.retain_loss_before)
        log(f"evaluation: {facts.evaluation.summary()}")

    def figures(self, model: Any, eval_loss: float | None = None) -> Figures:
        """Held-out loss (scored here unless given), perplexity, retain loss and forgetting of `model`."""
        spec, parts = self.config.spec, self.parts
        pad = parts.tokenizer.pad_token_id
        if eval_loss is None:
            eval_loss = score_loss(model, parts.eval_examples, pad, spec.dataset.packing)
        retain_spec = spec.evaluation.retain if spec.evaluation is not None else None
        retain = (
            score_loss(model, parts.retain_examples, pad, retain_spec.packing)
            if retain_spec is not None
            else None
        )
        return {
            "evalLoss": eval_loss,
            "perplexity": gate.perplexity(eval_loss) if spec.objective == "sft" else None,
            "retainLoss": retain,
            "forgetting": gate.forgetting(self.facts.retain_loss_before, retain),
        }

    def interpolate(self, out: Path, tuned: Any) -> list[dict[str, Any]]:
        """One row per alpha (1.0 included): evalLoss, perplexity, retainLoss, forgetting, exactMatch, generationPass.
        The mixes' weights go under interpolation/alpha-<a>/ (output.keepMixes)."""
        spec, tok = self.config.spec, self.parts.tokenizer
        base = {
            k: v.detach().clone()
            for k, v in model_mod.plain_model(self.rt.model_files.path(), spec).state_dict().items()
        }
        weights = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
        samples = self.parts.gen_examples[: spec.training.eval_generation_samples]
        checks = list(spec.evaluation.generations) if spec.evaluation is not None else []
        self._mix_state = (base, weights)
        rows = []
        for alpha in sorted({*spec.output.interpolate, 1.0}):
            tuned.load_state_dict(gate.mix(base, weights, alpha))
            row: dict[str, Any] = {"alpha": alpha, **self.figures(tuned)}
            row["exactMatch"] = exact_match(tuned, samples, tok) if samples else None
            passes = [g["passed"] for g in generation_checks(tuned, tok, checks)] if checks else []
            row["generationPass"] = sum(passes) / len(passes) if passes else None
            rows.append(row)
            if spec.output.keep_mixes and alpha != 1.0:
                self.save_mix(out, tuned, None, out / mix_dir(alpha))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "alpha" and v is not None)
            log(f"interpolation alpha {alpha:g}: {shown}")
        tuned.load_state_dict(weights)
        return rows

    def save_mix(self, out: Path, tuned: Any, alpha: float | None, target: Path) -> None:
        """Save `tuned` as it is (alpha None), or first mixed at `alpha`, to `target` (replacing it)."""
        if alpha is not None:
            base, weights = self._mix_state
            tuned.load_state_dict(gate.mix(base, weights, alpha))
        shutil.rmtree(target, ignore_errors=True)
        tuned.save_pretrained(target, safe_serialization=True)
        self.parts.tokenizer.save_pretrained(target)
        if alpha is not None:
            tuned.load_state_dict(self._mix_state[1])
