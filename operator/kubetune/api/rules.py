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
    return spec.training.per_device_batch_size * spec.distributed.nodes * spec.distributed.procs_per_node


def _batch_hint(spec: FineTuneJobSpec) -> str:
    micro, gbs = _micro(spec), spec.training.global_batch_size or 0
    return (
        f"must be a multiple of perDeviceBatchSize x nodes x procsPerNode = {micro} (got {gbs}); "
        f"try {max(micro, gbs // micro * micro)}"
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
        lambda s: bool(s.distributed.gpus_per_node) and s.distributed.gpus_per_node != s.distributed.procs_per_node,
        lambda s: f"must equal gpusPerNode ({s.distributed.gpus_per_node}): one process per GPU",
    ),
    Rule(
        "spec.distributed.offloadParams",
        "!has(self.distributed.offloadParams) || !self.distributed.offloadParams || "
        "(self.distributed.backend != 'ddp' && self.distributed.zeroStage == 3)",
        "needs backend deepspeed (or auto) with zeroStage: 3",
        lambda s: s.distributed.offload_params and (s.distributed.backend == "ddp" or s.distributed.zero_stage != 3),
    ),
    Rule(
        "spec.training.earlyStopping",
        "!has(self.training.earlyStopping) || has(self.dataset.eval) || self.dataset.evalSplit > 0.0",
        "needs evaluation data: set spec.dataset.eval or spec.dataset.evalSplit",
        lambda s: s.training.early_stopping is not None and not s.dataset.eval and s.dataset.eval_split == 0,
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


def cel_validations(rules: tuple[Rule, ...]) -> dict[str, Any]:
    """`x-kubernetes-validations` for a model's json_schema_extra."""
    return {"x-kubernetes-validations": [{"rule": r.cel, "message": f"{r.field}: {r.message}"} for r in rules]}
