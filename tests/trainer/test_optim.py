"""Learning-rate controls (LoRA+, the head's own rate, layer-wise decay) and NEFTune noise."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kubetune.api.models import FineTuneJobSpec
from kubetune_trainer import optim
from trainer_helpers import TINY_MODEL


def _spec(method: str = "full", lora: dict | None = None, **training: Any) -> FineTuneJobSpec:
    doc: dict[str, Any] = {"model": {"source": "/m"}, "dataset": {"train": "/d"}, "output": {"uri": "/o"}, "method": method,
                           "training": {"learningRate": 0.01, **training}}  # fmt: skip
    if lora is not None:
        doc["lora"] = lora
    return FineTuneJobSpec.model_validate(doc)


def _model() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)


def _rates(model: Any, spec: FineTuneJobSpec) -> dict[str, float]:
    groups = optim.param_groups(model, spec)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # each parameter once
    return {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_one_group_without_controls() -> None:
    assert len(optim.param_groups(_model(), _spec())) == 1


def test_layer_decay_scales_each_block_and_the_embeddings_below_it() -> None:
    rates = _rates(_model(), _spec(layerLrDecay=0.5, headLearningRate=0.02))
    assert rates["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.01 * 0.5)  # top block of 2
    assert rates["model.layers.0.mlp.down_proj.weight"] == pytest.approx(0.01 * 0.25)
    assert rates["model.embed_tokens.weight"] == pytest.approx(0.01 * 0.125)
    assert rates["lm_head.weight"] == 0.02 and rates["model.norm.weight"] == 0.01


def test_loraplus_and_the_saved_head() -> None:
    from kubetune.api.models import LoraSpec
    from kubetune_trainer.peft_methods import apply_adapter

    spec = _spec(
        "lora",
        lora=LoraSpec(r=4, loraplus_lr_ratio=16, modules_to_save=["lm_head"]).to_wire(),
        headLearningRate=0.003,
    )
    rates = _rates(apply_adapter(_model(), spec, TINY_MODEL), spec)
    a = {r for n, r in rates.items() if "lora_A" in n}
    b = {r for n, r in rates.items() if "lora_B" in n}
    head = {r for n, r in rates.items() if "lm_head" in n}
    assert a == {0.01} and b == {0.16} and head == {0.003}


def test_the_scheduler_keeps_the_ratios() -> None:
    from transformers import get_scheduler

    model = _model()
    opt = torch.optim.AdamW(optim.param_groups(model, _spec(layerLrDecay=0.5)), lr=0.01)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted(sched.get_last_lr())
    assert lrs[-1] / lrs[0] == pytest.approx(1 / 0.5**3)


def test_neftune_adds_bounded_noise_only_while_training() -> None:
    model = _model()
    ids = torch.tensor([[3, 4, 5, 6]])
    clean = model.get_input_embeddings()(ids)
    optim.install_neftune(model, alpha=5.0)
    model.train()
    noisy = model.get_input_embeddings()(ids)
    bound = 5.0 / (4 * clean.shape[-1]) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
