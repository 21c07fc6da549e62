"""Cross-field rules on the FineTuneJob spec, written once.

Each rule yields both checks: the CEL rule the API server runs (`x-kubernetes-validations`
on FineTuneJobSpec, see models.py) and its Python twin, which `kubetune validate`,
`kubetune run` and the operator run without a cluster (validation.py). Both report
"<field>: <message>"; the Python side may say more (`explain`, e.g. the numbers involved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.elastic import RESHARDABLE_ZERO_STAGES

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec


@dataclass(frozen=True)
class Rule:
    field: str
    """Where the fix goes, e.g. spec.lora."""
    cel: str
    """The rule as the API server checks it, over `self` = spec; true when the spec is fine."""
    message: str
    """What is wrong and what to do, after "<field>: "."""
    broken: Callable[[FineTuneJobSpec], bool]
    """The Python twin: true when the spec breaks the rule."""
    explain: Callable[[FineTuneJobSpec], str] | None = None
    """A more specific message for the Python check (default: `message`)."""

    def describe(self, spec: FineTuneJobSpec) -> str:
        return self.explain(spec) if self.explain is not None else self.message


def _micro(spec: FineTuneJobSpec) -> int:
    return spec.training.per_device_batch_size * spec.distributed.world_size


def _batch_hint(spec: FineTuneJobSpec) -> str:
    micro, gbs = _micro(spec), spec.training.global_batch_size or 0
    return (
        f"must be a multiple of perDeviceBatchSize x nodes x procsPerNode = {micro} (got {gbs}); "
        f"try {max(micro, gbs // micro * micro)}"
    )


def _gang_min(spec: FineTuneJobSpec) -> int | None:
    gang = spec.scheduling.gang if spec.scheduling is not None else None
    return gang.min_member if gang is not None else None


def _reshardable_cel() -> str:
    stages = ", ".join(str(s) for s in RESHARDABLE_ZERO_STAGES)
    offload = (
        "!(has(self.distributed.offloadOptimizer) && self.distributed.offloadOptimizer) && "
        "!(has(self.distributed.offloadParams) && self.distributed.offloadParams)"
    )
    return f"self.distributed.backend == 'ddp' || (self.distributed.zeroStage in [{stages}] && {offload})"


def _reshard_message() -> str:
    stages = ", ".join(str(s) for s in RESHARDABLE_ZERO_STAGES)
    return (
        "elastic resume loads checkpoints at another world size: DDP's, and DeepSpeed ZeRO stage "
        f"{stages} without offload (converted to DeepSpeed's universal checkpoint); with offloadOptimizer or "
        "offloadParams that is not supported: turn offload off, set distributed.backend: ddp, or remove minNodes"
    )


def _reshardable(s: FineTuneJobSpec) -> bool:
    d = s.distributed
    return d.backend == "ddp" or (
        d.zero_stage in RESHARDABLE_ZERO_STAGES and not d.offload_optimizer and not d.offload_params
    )


def _only_with_method(block: str, attr: str, method: str) -> Rule:
    return Rule(
        f"spec.{block}",
        f"self.method == '{method}' || !has(self.{block})",
        f"is only allowed with method: {method}; remove spec.{block} or set spec.method: {method}",
        lambda s: getattr(s, attr) is not None and s.method != method,
    )


SPEC_RULES: tuple[Rule, ...] = (
    Rule(
        "spec.lora",
        "self.method in ['lora', 'dora'] || !has(self.lora)",
        "is only allowed with method: lora or dora; remove spec.lora or set spec.method",
        lambda s: s.lora is not None and s.method not in ("lora", "dora"),
    ),
    _only_with_method("promptTuning", "prompt_tuning", "prompt_tuning"),
    _only_with_method("prefixTuning", "prefix_tuning", "prefix_tuning"),
    _only_with_method("ia3", "ia3", "ia3"),
    Rule(
        "spec.dpo",
        "self.objective == 'dpo' || !has(self.dpo)",
        "is only allowed with objective: dpo; remove spec.dpo or set spec.objective: dpo",
        lambda s: s.dpo is not None and s.objective != "dpo",
    ),
    Rule(
        "spec.model.quantization",
        "!has(self.model.quantization) || self.method in ['lora', 'dora']",
        "(QLoRA) trains an adapter on the quantized base: set spec.method to lora or dora",
        lambda s: s.model.quantization is not None and s.method not in ("lora", "dora"),
    ),
    Rule(
        "spec.training.globalBatchSize",
        "!has(self.training.globalBatchSize) || self.training.globalBatchSize % "
        "(self.training.perDeviceBatchSize * self.distributed.nodes * self.distributed.procsPerNode) == 0",
        "must be a multiple of perDeviceBatchSize x nodes x procsPerNode",
        lambda s: s.training.global_batch_size is not None and s.training.global_batch_size % _micro(s) != 0,
        _batch_hint,
    ),
    Rule(
        "spec.distributed.procsPerNode",
        "self.distributed.gpusPerNode == 0 || self.distributed.gpusPerNode == self.distributed.procsPerNode",
        "must equal gpusPerNode on GPU nodes (one process per GPU)",
        lambda s: (
            bool(s.distributed.gpus_per_node) and s.distributed.gpus_per_node != s.distributed.procs_per_node
        ),
        lambda s: f"must equal gpusPerNode ({s.distributed.gpus_per_node}): one process per GPU",
    ),
    Rule(
        "spec.distributed.minNodes",
        "!has(self.distributed.minNodes) || self.distributed.minNodes <= self.distributed.nodes",
        "cannot exceed distributed.nodes (the gang's full size): lower it, or leave it unset for a fixed-size gang",
        lambda s: s.distributed.min_nodes is not None and s.distributed.min_nodes > s.distributed.nodes,
        lambda s: (
            f"cannot exceed distributed.nodes ({s.distributed.nodes}; got {s.distributed.min_nodes}): set it to at "
            f"most {s.distributed.nodes}, or leave it unset for a fixed-size gang"
        ),
    ),
    Rule(
        "spec.distributed.minNodes",
        f"!has(self.distributed.minNodes) || {_reshardable_cel()}",
        _reshard_message(),
        lambda s: s.distributed.min_nodes is not None and not _reshardable(s),
    ),
    Rule(
        "spec.distributed.offloadParams",
        "!has(self.distributed.offloadParams) || !self.distributed.offloadParams || "
        "(self.distributed.backend != 'ddp' && self.distributed.zeroStage == 3)",
        "needs backend deepspeed (or auto) with zeroStage: 3",
        lambda s: (
            s.distributed.offload_params and (s.distributed.backend == "ddp" or s.distributed.zero_stage != 3)
        ),
    ),
    Rule(
        "spec.training.earlyStopping",
        "!has(self.training.earlyStopping) || has(self.dataset.eval) || self.dataset.evalSplit > 0.0",
        "needs evaluation data: set spec.dataset.eval or spec.dataset.evalSplit",
        lambda s: s.training.early_stopping is not None and not s.dataset.eval and s.dataset.eval_split == 0,
    ),
    Rule(
        "spec.scheduling.gang.minMember",
        "!has(self.scheduling) || !has(self.scheduling.gang) || !has(self.scheduling.gang.minMember) || "
        "self.scheduling.gang.minMember <= self.distributed.nodes",
        "cannot exceed the gang's pods (distributed.nodes): lower it, or leave it unset for the whole gang",
        lambda s: _gang_min(s) is not None and (_gang_min(s) or 0) > s.distributed.nodes,
        lambda s: (
            f"cannot exceed the gang's {s.distributed.nodes} pods (distributed.nodes; got {_gang_min(s)}): "
            f"set it to at most {s.distributed.nodes}, or leave it unset for the whole gang"
        ),
    ),
    Rule(
        "spec.scheduling.gang.queue",
        "!has(self.scheduling) || !has(self.scheduling.gang) || self.scheduling.gang.scheduler != 'kai' || "
        "has(self.scheduling.gang.queue)",
        "is required with scheduler: kai (KAI schedules only pods of a queue): name the KAI queue",
        lambda s: (
            s.scheduling is not None
            and s.scheduling.gang is not None
            and s.scheduling.gang.scheduler == "kai"
            and not s.scheduling.gang.queue
        ),
    ),
    Rule(
        "spec.serving.image",
        "!has(self.serving) || !has(self.serving.kind) || self.serving.kind != 'Deployment' || has(self.serving.image)",
        "is required with kind: Deployment; name the serving image (e.g. vllm/vllm-openai) or use kind: InferenceService",
        lambda s: s.serving is not None and s.serving.kind == "Deployment" and not s.serving.image,
    ),
    Rule(
        "spec.serving.model",
        "!has(self.serving) || !has(self.serving.model) || self.serving.model != 'adapter' || self.method in ['lora', 'dora']",
        "adapter is served with vLLM's --enable-lora, which takes LoRA adapters only: use method lora or dora, or serving.model: merged",
        lambda s: s.serving is not None and s.serving.model == "adapter" and s.method not in ("lora", "dora"),
    ),
)


_EVAL_DATA_CEL = "has(self.dataset.eval) || self.dataset.evalSplit > 0.0"


def _has_eval_data(s: FineTuneJobSpec) -> bool:
    return bool(s.dataset.eval) or s.dataset.eval_split > 0


def _gate(s: FineTuneJobSpec, attr: str) -> bool:
    """Whether spec.evaluation.gate.<attr> is set."""
    gate = s.evaluation.gate if s.evaluation is not None else None
    return gate is not None and getattr(gate, attr) is not None


def _gate_rule(
    key: str, attr: str, needs_cel: str, needs: Callable[[FineTuneJobSpec], bool], message: str
) -> Rule:
    """spec.evaluation.gate.<key> is only meaningful when `needs` holds."""
    return Rule(
        f"spec.evaluation.gate.{key}",
        f"!has(self.evaluation) || !has(self.evaluation.gate) || !has(self.evaluation.gate.{key}) || {needs_cel}",
        message,
        lambda s: _gate(s, attr) and not needs(s),
    )


def _select(s: FineTuneJobSpec, *metrics: str) -> bool:
    return s.output.select == "best" and s.output.select_metric in metrics


def _select_rule(
    metrics: tuple[str, ...], needs_cel: str, needs: Callable[[FineTuneJobSpec], bool], message: str
) -> Rule:
    listed = ", ".join(f"'{m}'" for m in metrics)
    return Rule(
        "spec.output.selectMetric",
        f"!has(self.output.select) || self.output.select != 'best' || !(self.output.selectMetric in [{listed}]) || {needs_cel}",
        message,
        lambda s: _select(s, *metrics) and not needs(s),
    )


_HAS_GENERATIONS_CEL = (
    "(has(self.evaluation) && has(self.evaluation.generations) && size(self.evaluation.generations) > 0)"
)
_HAS_RETAIN_CEL = "(has(self.evaluation) && has(self.evaluation.retain))"
_INTERPOLATES_CEL = "(has(self.output.interpolate) && size(self.output.interpolate) > 0)"


def _generations(s: FineTuneJobSpec) -> bool:
    return s.evaluation is not None and bool(s.evaluation.generations)


def _retain(s: FineTuneJobSpec) -> bool:
    return s.evaluation is not None and s.evaluation.retain is not None


def _full_weights(s: FineTuneJobSpec) -> bool:
    """Mirrors methods.writes_full_model (which imports the models, hence not imported here)."""
    return s.method == "full" or (s.method in ("lora", "dora", "ia3") and s.output.merge_adapter is not False)


EVALUATION_RULES: tuple[Rule, ...] = (
    _gate_rule("maxEvalLoss", "max_eval_loss", f"({_EVAL_DATA_CEL})", _has_eval_data,
               "needs evaluation data: set spec.dataset.eval or spec.dataset.evalSplit"),
    _gate_rule("maxPerplexity", "max_perplexity", f"(({_EVAL_DATA_CEL}) && self.objective == 'sft')",
               lambda s: _has_eval_data(s) and s.objective == "sft",
               "needs evaluation data (spec.dataset.eval or evalSplit) and objective: sft; with dpo use maxEvalLoss"),
    _gate_rule("minExactMatch", "min_exact_match", "self.training.evalGenerationSamples > 0",
               lambda s: s.training.eval_generation_samples > 0,
               "needs spec.training.evalGenerationSamples > 0 (the held-out answers it counts)"),
    _gate_rule("minGenerationPass", "min_generation_pass", _HAS_GENERATIONS_CEL, _generations,
               "needs checks to count: add spec.evaluation.generations"),
    _gate_rule("maxForgettingPercent", "max_forgetting_percent", _HAS_RETAIN_CEL, _retain,
               "needs a retain set to measure forgetting on: set spec.evaluation.retain"),
    Rule(
        "spec.output.interpolate",
        f"!{_INTERPOLATES_CEL} || (self.objective == 'sft' && (self.method == 'full' || "
        "(self.method in ['lora', 'dora', 'ia3'] && (!has(self.output.mergeAdapter) || self.output.mergeAdapter))))",
        "mixes full weights: it needs objective sft and method full, or lora, dora or ia3 with the adapter merged "
        "(leave spec.output.mergeAdapter unset or true); or remove it",
        lambda s: bool(s.output.interpolate) and not (s.objective == "sft" and _full_weights(s)),
    ),
    Rule(
        "spec.output.select",
        f"!has(self.output.select) || self.output.select != 'best' || {_INTERPOLATES_CEL}",
        "best picks among weight mixes: list them in spec.output.interpolate (e.g. [0.25, 0.5, 0.75]) or set select: fineTuned",
        lambda s: s.output.select == "best" and not s.output.interpolate,
    ),
    _select_rule(("evalLoss", "perplexity"), f"({_EVAL_DATA_CEL})", _has_eval_data,
                 "evalLoss and perplexity need evaluation data: set spec.dataset.eval or evalSplit, or pick another metric"),
    _select_rule(("retainLoss", "forgetting"), _HAS_RETAIN_CEL, _retain,
                 "retainLoss and forgetting need spec.evaluation.retain: set it or pick another metric"),
    _select_rule(("exactMatch",), "self.training.evalGenerationSamples > 0", lambda s: s.training.eval_generation_samples > 0,
                 "exactMatch needs spec.training.evalGenerationSamples > 0: set it or pick another metric"),
    _select_rule(("generationPass",), _HAS_GENERATIONS_CEL, _generations,
                 "generationPass needs spec.evaluation.generations: add checks or pick another metric"),
)  # fmt: skip


def cel_validations(rules: tuple[Rule, ...]) -> dict[str, Any]:
    """`x-kubernetes-validations` for a model's json_schema_extra."""
    return {
        "x-kubernetes-validations": [{"rule": r.cel, "message": f"{r.field}: {r.message}"} for r in rules]
    }
