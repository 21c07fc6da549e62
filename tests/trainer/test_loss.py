"""The chunked linear + cross-entropy loss is the model's own loss, with the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubetune.api.models import FineTuneJobSpec
from kubetune_trainer import loss as loss_mod
from kubetune_trainer import model as model_mod
from trainer_helpers import TINY_MODEL


def spec(method: str) -> FineTuneJobSpec:
    doc: dict = {
        "model": {"source": str(TINY_MODEL)},
        "dataset": {"train": "/tmp/x.jsonl"},
        "output": {"uri": "file:///tmp/x"},
        "method": method,
    }
    if method.startswith("lora"):
        doc["method"] = "lora"
        doc["lora"] = {"dropout": 0.0}  # the two models must see the same activations
        if method == "lora+head":
            doc["lora"]["modulesToSave"] = ["lm_head"]  # peft wraps the head: its trained copy is used
    return FineTuneJobSpec.model_validate(doc)


def batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 37), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt: no loss there
    labels[1, 20:] = -100
    # Two packed examples in row 2: positions restart, the second example's first token unlabelled.
    position_ids = torch.cat(
        [torch.arange(37).expand(2, 37), torch.cat([torch.arange(17), torch.arange(20)])[None]], 0
    )
    labels[2, 17] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora", "lora+head"])
def test_same_loss_and_gradients_as_the_models_own(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setenv(loss_mod.ENV_DISABLE, "0")
    reference = model_mod.prepare_model(spec(method), TINY_MODEL, on_gpu=False)
    monkeypatch.setenv(loss_mod.ENV_DISABLE, "1")
    torch.manual_seed(0)
    chunked = model_mod.prepare_model(spec(method), TINY_MODEL, on_gpu=False)
    assert loss_mod.supported(chunked) is None
    assert loss_mod.install(chunked, chunk=16)  # several chunks, the last one short
    chunked.load_state_dict(reference.state_dict())
    data = batch(
        reference.config.vocab_size if method == "full" else reference.get_base_model().config.vocab_size
    )
    if method == "lora+head":
        names = {n for n, p in chunked.named_parameters() if p.requires_grad}
        assert any("lm_head.modules_to_save" in n for n in names)

    ref_out = reference(**data, use_cache=False)
    out = chunked(**data, use_cache=False)
    assert out.logits is None  # never materialised
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    ref_out.loss.backward()
    (out.loss * 1.0).backward()
    ref_grads, got = grads(reference), grads(chunked)
    assert ref_grads.keys() == got.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bias_gradient_scaling_and_ignored_rows() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(50, 8, dtype=torch.float32, requires_grad=True)
    head = torch.nn.Linear(8, 30, dtype=torch.float32)
    labels = torch.randint(0, 30, (50,))
    labels[::4] = -100
    expected = F.cross_entropy(head(hidden), labels, ignore_index=-100) * 3.0
    expected.backward()
    want = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    got = loss_mod.linear_cross_entropy(hidden, head.weight, head.bias, labels, chunk=7) * 3.0
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip((hidden.grad, head.weight.grad, head.bias.grad), want, strict=True):
        torch.testing.assert_close(a, b)


def test_all_ignored_gives_zero_loss_and_gradients() -> None:
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    out = loss_mod.linear_cross_entropy(hidden, weight, None, torch.full((5,), -100))
    out.backward()
    assert out.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_autocast_bf16_matches_the_model_within_bf16_precision() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(64, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(head(hidden).float(), labels)
        got = loss_mod.linear_cross_entropy(hidden, head.weight, None, labels, chunk=10)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    got.backward()
    assert (
        head.weight.grad is not None
        and head.weight.grad.dtype == torch.float32
        and hidden.grad.dtype == torch.float32
    )


def test_only_plain_heads_are_patched() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40))
    assert "not one with a plain lm_head" in (loss_mod.supported(gpt2) or "")
    assert not loss_mod.install(gpt2)


def test_chunk_size_follows_the_vocabulary() -> None:
    assert loss_mod.chunk_tokens(151936) == 441 and loss_mod.chunk_tokens(100) == 8192
