"""The peft family beyond LoRA (DoRA, IA3, prompt tuning, prefix tuning) and LoRA's own options:
each builds on the tiny model, trains on two real ranks with a falling loss, and its artifacts load
with stock peft/transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api.models import FineTuneJobSpec
from kubetune_trainer.peft_methods import apply_adapter, lora_config
from trainer_helpers import TINY_MODEL, job_spec, rank_dumps, run_trainer


def _spec(method: str, **blocks: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": "/m"},
            "dataset": {"train": "/d"},
            "output": {"uri": "/o"},
            "method": method,
            **blocks,
        }
    )


def _model() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)


def _trainable(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_dora_adds_magnitude_vectors_to_lora() -> None:
    names = _trainable(apply_adapter(_model(), _spec("dora", lora={"r": 4}), TINY_MODEL))
    assert any("lora_magnitude_vector" in n for n in names) and any("lora_A" in n for n in names)


def test_rslora_and_per_module_ranks() -> None:
    model = apply_adapter(
        _model(),
        _spec("lora", lora={"r": 4, "alpha": 8, "useRslora": True, "rankPattern": {"down_proj": 8}}),
        TINY_MODEL,
    )
    down = model.base_model.model.model.layers[0].mlp.down_proj
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert down.r["default"] == 8 and q.r["default"] == 4
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r), not alpha / r


def test_ia3_scales_keys_values_and_feed_forward_only() -> None:
    names = _trainable(apply_adapter(_model(), _spec("ia3"), TINY_MODEL))
    assert names and all("ia3_l" in n for n in names)
    assert {n.split(".")[-3] for n in names} == {"k_proj", "v_proj", "down_proj"}


def test_prompt_tuning_from_text_starts_at_the_texts_embeddings() -> None:
    model = apply_adapter(
        _model(),
        _spec("prompt_tuning", promptTuning={"numVirtualTokens": 3, "initText": "seven zero two"}),
        TINY_MODEL,
    )
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(TINY_MODEL))("seven zero two", add_special_tokens=False)[
        "input_ids"
    ]
    table = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, model.get_input_embeddings().weight[ids])


def test_an_unknown_ia3_target_names_the_block() -> None:
    from kubetune_trainer.errors import TrainerError

    with pytest.raises(TrainerError, match=r"^spec.ia3: "):
        apply_adapter(
            _model(),
            _spec("ia3", ia3={"targetModules": ["nope"], "feedforwardModules": ["nope"]}),
            TINY_MODEL,
        )


def test_lora_config_carries_the_options() -> None:
    from kubetune.api.models import LoraSpec

    config = lora_config(
        LoraSpec(r=4, use_rslora=True, rank_pattern={"down_proj": 8}, alpha_pattern={"q_proj": 2.0}),
        dora=True,
    )
    assert (
        config.use_dora
        and config.use_rslora
        and config.rank_pattern == {"down_proj": 8}
        and config.alpha_pattern == {"q_proj": 2.0}
    )


# ---------------------------------------------------------------- two ranks

CASES = {
    # DoRA with rsLoRA, LoRA+ (B matrices at 4x) and the saved lm_head at its own rate.
    "dora": {"method": "dora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modulesToSave": ["lm_head"], "useRslora": True,
                                        "loraplusLrRatio": 4.0}, "training.headLearningRate": 0.01},
    # QLoRA: LoRA on the 4-bit NF4 base (bitsandbytes runs it on CPU too), DDP across the ranks.
    "qlora": {"method": "lora", "model.quantization": {"bits": 4, "type": "nf4", "doubleQuant": True}},
    "ia3": {"method": "ia3", "lora": None, "training.learningRate": 0.2},
    "prompt_tuning": {"method": "prompt_tuning", "lora": None, "promptTuning": {"numVirtualTokens": 8}, "training.learningRate": 0.05},
    "prefix_tuning": {"method": "prefix_tuning", "lora": None, "prefixTuning": {"numVirtualTokens": 8}, "training.learningRate": 0.05},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_method_trains_on_two_ranks_and_its_adapter_loads_with_peft(tmp_path: Path, case: str) -> None:
    overrides = dict(CASES[case])
    spec = job_spec(tmp_path, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("lora", 0) is None:
        spec.pop("lora")
    code, out = run_trainer(tmp_path, spec)
    assert code == 0, out[-4000:]
    ranks = rank_dumps(tmp_path)
    assert [r["worldSize"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    curve = [p["loss"] for p in ranks[0]["lossCurve"]]
    # DoRA learns like LoRA; IA3 and prompt/prefix tuning (a few thousand parameters on a random model) far slower.
    assert curve[-1] < (0.75 * curve[0] if case in ("dora", "qlora") else curve[0] - 0.05), curve
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["evalLossAfter"] < metrics["evalLossBefore"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = PeftModel.from_pretrained(_model(), str(tmp_path / "out" / "adapter")).eval()
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["peft_type"] == {
        "dora": "LORA", "qlora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}[case]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "adapter"))
    ids = torch.tensor([tok("seven zero two nine", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        tuned = adapter(input_ids=ids).logits[:, -ids.shape[1] :]
    merged_dir = tmp_path / "out" / "model"
    if case == "qlora":  # merged into the de-quantized (original) weights, and the metrics say so
        assert (
            metrics["quantizedLayers"] == 14
        )  # q, k, v, o, gate, up, down in both blocks: 4-bit under the adapter
        assert metrics["mergedModel"].startswith("de-quantized"), metrics.get("mergedModel")
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
        assert (
            not any("4bit" in type(m).__name__ for m in merged.modules())
            and (merged_dir / "model.safetensors").exists()
        )
    elif case in ("dora", "ia3"):  # merged by default, and the merge computes what the adapter does
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, tuned, atol=1e-4)
    else:  # prompt and prefix tuning add inputs, not weights: nothing to merge
        assert not merged_dir.exists()
