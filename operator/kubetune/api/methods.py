"""Facts about the fine-tuning methods that the operator, validation and the trainer share."""

from __future__ import annotations

from typing import Final

from kubetune.api.models import FineTuneJobSpec

ADAPTER_METHODS: Final = frozenset({"lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"})
"""Methods that train a peft adapter on a frozen base (saved under adapter/)."""
MERGEABLE_METHODS: Final = frozenset({"lora", "dora", "ia3"})
"""Adapters peft can fold into the base weights; prompt and prefix tuning add inputs, not weights."""
PROMPT_LEARNING_METHODS: Final = frozenset({"prompt_tuning", "prefix_tuning"})
"""Methods that add virtual tokens: peft ignores position_ids for them, so packing cannot work."""


def is_adapter(spec: FineTuneJobSpec) -> bool:
    return spec.method in ADAPTER_METHODS


def merges_adapter(spec: FineTuneJobSpec) -> bool:
    """Whether the trainer writes a merged model for an adapter method (unset: where peft can)."""
    if not is_adapter(spec):
        return False
    if spec.output.merge_adapter is None:
        return spec.method in MERGEABLE_METHODS
    return spec.output.merge_adapter


def writes_full_model(spec: FineTuneJobSpec) -> bool:
    """Whether the job's artifacts include full model weights under model/ (full fine-tune or a merge)."""
    return not is_adapter(spec) or merges_adapter(spec)


def served_artifact(spec: FineTuneJobSpec) -> str:
    """What spec.serving serves: `merged` weights (merged adapter or full fine-tune) or the `adapter` on its base."""
    want = spec.serving.model if spec.serving is not None else "auto"
    if want != "auto":
        return want
    return "merged" if writes_full_model(spec) else "adapter"


def published_artifact(spec: FineTuneJobSpec) -> str | None:
    """What spec.output.publish pushes: `model` (merged or fully fine-tuned weights) or `adapter`; None without
    publish. Unset `artifact`: the model where the job writes one, else the adapter."""
    publish = spec.output.publish
    if publish is None:
        return None
    return publish.artifact or ("model" if writes_full_model(spec) else "adapter")
