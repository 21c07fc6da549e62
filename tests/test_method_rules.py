"""The rules for the adapter methods, QLoRA, DPO and the learning-rate controls: each problem names the
field and the fix, in `kubetune validate` and (for the CEL twins) in the CRD."""

from __future__ import annotations

import pytest
from kubetune.api import methods
from kubetune.api.crd import crd
from kubetune.api.validation import validate_manifest
from operator_samples import manifest, spec

GPU = {"gpusPerNode": 1, "procsPerNode": 1}


def problems(**overrides):  # type: ignore[no-untyped-def]
    return [str(p) for p in validate_manifest(manifest(**overrides))[1]]


@pytest.mark.parametrize(
    "method, block",
    [("dora", {"lora": {"r": 8, "useRslora": True, "rankPattern": {"down_proj": 16}, "loraplusLrRatio": 16}}),
     ("ia3", {"ia3": {"targetModules": ["k_proj", "down_proj"], "feedforwardModules": ["down_proj"]}}),
     ("prompt_tuning", {"promptTuning": {"numVirtualTokens": 8, "initText": "answer with digits"}}),
     ("prefix_tuning", {"prefixTuning": {"numVirtualTokens": 8, "projection": True}})],
)  # fmt: skip
def test_each_method_with_its_block_is_valid(method: str, block: dict) -> None:
    assert problems(method=method, **block) == []


@pytest.mark.parametrize("block", ["promptTuning", "prefixTuning", "ia3"])
def test_a_method_block_needs_its_method(block: str) -> None:
    [problem] = problems(method="lora", **{block: {}})
    assert problem.startswith(f"spec.{block}: is only allowed with method:")


def test_lora_block_is_shared_by_dora_only() -> None:
    [problem] = problems(method="ia3", lora={"r": 4})
    assert problem.startswith("spec.lora: is only allowed with method: lora or dora")


def test_prompt_tuning_cannot_be_merged() -> None:
    [problem] = problems(method="prompt_tuning", output={"uri": "s3://out/x", "mergeAdapter": True})
    assert problem.startswith(
        "spec.output.mergeAdapter: method prompt_tuning adds virtual tokens, not weights"
    )


def test_merging_defaults_to_where_peft_can() -> None:
    assert methods.merges_adapter(spec(method="dora")) and methods.merges_adapter(spec(method="ia3"))
    assert not methods.merges_adapter(spec(method="prefix_tuning"))
    assert not methods.merges_adapter(
        spec(method="lora", output={"uri": "s3://out/x", "mergeAdapter": False})
    )
    assert methods.writes_full_model(spec(method="full")) and not methods.writes_full_model(
        spec(method="prompt_tuning")
    )


def test_prefix_tuning_refuses_packing() -> None:
    [problem] = problems(method="prefix_tuning", dataset={"train": "/d.jsonl", "packing": True})
    assert problem.startswith("spec.dataset.packing: cannot be used with method prefix_tuning")


def test_ia3_targets_need_feedforward_modules_among_them() -> None:
    [problem] = problems(method="ia3", ia3={"targetModules": ["k_proj"], "feedforwardModules": ["down_proj"]})
    assert (
        problem == "spec.ia3.feedforwardModules: ['down_proj'] must also be listed in spec.ia3.targetModules"
    )


def test_qlora_on_cpu_is_valid() -> None:
    assert (
        problems(model={"source": "s3://models/x", "quantization": {"bits": 8}}) == []
    )  # bitsandbytes >= 0.50 runs on CPU


def test_qlora_needs_an_adapter_on_top() -> None:
    found = problems(method="full", model={"source": "s3://models/x", "quantization": {}}, distributed=GPU)
    assert found == [
        "spec.model.quantization: (QLoRA) trains an adapter on the quantized base: set spec.method to lora or dora"
    ]


def test_qlora_on_gpus_with_ddp_is_valid_and_zero3_is_refused() -> None:
    assert (
        problems(
            method="dora", model={"source": "s3://models/x", "quantization": {"type": "fp4"}}, distributed=GPU
        )
        == []
    )
    zero3 = {**GPU, "backend": "deepspeed", "zeroStage": 3}
    [problem] = problems(model={"source": "s3://models/x", "quantization": {}}, distributed=zero3)
    assert problem.startswith("spec.distributed.backend: QLoRA trains with DDP")


def test_qlora_auto_backend_is_ddp_on_many_gpus() -> None:
    from kubetune_trainer.backend import choose_backend

    s = spec(
        model={"source": "s3://models/x", "quantization": {}},
        distributed={"gpusPerNode": 8, "procsPerNode": 8, "nodes": 2},
    )
    choice = choose_backend(
        s, on_gpu=True, sizes=lambda: (10**15, 80 * 2**30)
    )  # however big: QLoRA stays on DDP
    assert not choice.deepspeed and "QLoRA" in choice.reason


def test_dpo_block_needs_objective_dpo() -> None:
    [problem] = problems(dpo={"beta": 0.1})
    assert problem.startswith("spec.dpo: is only allowed with objective: dpo")


def test_dpo_refuses_packing_and_label_smoothing_outside_robust() -> None:
    found = problems(
        objective="dpo",
        dpo={"lossType": "ipo", "labelSmoothing": 0.1},
        dataset={"train": "/d.jsonl", "packing": True},
    )
    assert [p.split(":")[0] for p in found] == ["spec.dataset.packing", "spec.dpo.labelSmoothing"]


def test_layer_lr_decay_is_for_full_fine_tuning() -> None:
    assert (
        problems(method="full", training={"layerLrDecay": 0.8, "headLearningRate": 1e-3, "neftuneAlpha": 5})
        == []
    )
    [problem] = problems(training={"layerLrDecay": 0.8})
    assert problem.startswith("spec.training.layerLrDecay: applies to method full")


def test_head_learning_rate_with_an_adapter_needs_a_saved_head() -> None:
    [problem] = problems(training={"headLearningRate": 1e-3})
    assert "add lm_head to spec.lora.modulesToSave" in problem
    assert problems(training={"headLearningRate": 1e-3}, lora={"modulesToSave": ["lm_head"]}) == []


def test_crd_carries_a_cel_twin_for_every_block_rule() -> None:
    rules = " ".join(
        r["rule"]
        for r in crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "x-kubernetes-validations"
        ]
    )
    for fragment in (
        "has(self.promptTuning)",
        "has(self.prefixTuning)",
        "has(self.ia3)",
        "has(self.dpo)",
        "has(self.model.quantization)",
    ):
        assert fragment in rules
