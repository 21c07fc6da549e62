"""torch.compile of the trainer's decoder layers (KUBETUNE_COMPILE=1, kernels.compile_layers): the compiled model
gives the same loss and gradients as the eager one, on one flattened micro-batch of ragged examples through the
trainer's attention switch. The same check runs on the GPU in bf16 in call B of bench/gpu_check.sh."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow  # inductor compiles two layers forward and backward: ~40 s idle, minutes on two busy cores
def test_compiled_decoder_layers_match_eager() -> None:
    import gpu_preflight

    r = gpu_preflight.check_compile(torch.device("cpu"), torch.float32)
    assert r["layers_compiled"] == 2, r
    assert r["graphs_compiled"] > 0, (
        r
    )  # dynamo really compiled something (compile_layers is not a silent no-op)
    assert r["loss_diff"] < 1e-4 and r["second_step_loss_diff"] < 1e-4, r
    assert r["max_grad_rel_err"] < 1e-4, r
    assert r["ok"], r


def test_compile_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import kernels
    from transformers import Qwen2Config, Qwen2ForCausalLM

    monkeypatch.delenv(kernels.ENV_COMPILE, raising=False)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1))  # fmt: skip
    assert kernels.compile_layers(model) == 0
    assert not any(
        type(layer).__name__ == "OptimizedModule" or getattr(layer, "_compiled_call_impl", None)
        for layer in model.model.layers
    )
