"""LoRA targets and modules_to_save, freezing by layer count or by name."""

from __future__ import annotations

import pytest
from kubetune.api.models import FreezeSpec, LoraSpec
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.model import apply_freeze, apply_lora, layer_index
from trainer_helpers import TINY_MODEL


def _model():  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)


def _trainable(model) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_all_linear_adapts_every_linear_but_the_head() -> None:
    names = _trainable(apply_lora(_model(), LoraSpec(r=4)))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in names), proj
    assert not any("lm_head" in n for n in names)


def test_lora_named_targets_and_modules_to_save() -> None:
    names = _trainable(
        apply_lora(_model(), LoraSpec(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    )
    assert any("q_proj.lora_A" in n for n in names) and not any("o_proj.lora" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)


def test_lora_unknown_target_is_config_invalid() -> None:
    with pytest.raises(TrainerError) as err:
        apply_lora(_model(), LoraSpec(target_modules=["no_such_module"]))
    assert err.value.exit_code == 64


def test_freeze_first_n_layers() -> None:
    model = _model()
    apply_freeze(model, FreezeSpec(first_n_layers=1))
    names = _trainable(model)
    assert not any(layer_index(n) == 0 or "embed" in n for n in names)
    assert any(layer_index(n) == 1 for n in names) and "lm_head.weight" in names


def test_train_only_named_modules() -> None:
    model = _model()
    apply_freeze(model, FreezeSpec(trainable_modules=["lm_head", "layers.1.mlp"]))
    assert set(_trainable(model)) == {"lm_head.weight"} | {
        n for n, _ in model.named_parameters() if "layers.1.mlp" in n
    }


def test_freezing_everything_is_refused() -> None:
    with pytest.raises(TrainerError):
        apply_freeze(_model(), FreezeSpec(trainable_modules=["nothing-matches"]))


def test_training_dtype() -> None:
    import torch
    from kubetune.api.models import FineTuneJobSpec
    from kubetune_trainer.precision import training_dtype

    def spec(method: str, dtype: str = "auto") -> FineTuneJobSpec:
        return FineTuneJobSpec.model_validate(
            {
                "model": {"source": "/m", "dtype": dtype},
                "dataset": {"train": "/d"},
                "output": {"uri": "/o"},
                "method": method,
            }
        )

    assert (
        training_dtype(spec("full"), on_gpu=True, deepspeed=False) == torch.float32
    )  # fp32 master weights under DDP
    assert training_dtype(spec("full"), on_gpu=True, deepspeed=True) == resolve_auto_gpu()
    assert training_dtype(spec("lora"), on_gpu=False, deepspeed=False) == torch.float32  # CPU: always fp32
    assert (
        training_dtype(spec("full", "float16"), on_gpu=True, deepspeed=False) == torch.float16
    )  # asked for explicitly


def resolve_auto_gpu():  # type: ignore[no-untyped-def]
    from kubetune_trainer.precision import resolve_dtype

    return resolve_dtype("auto", on_gpu=True)
