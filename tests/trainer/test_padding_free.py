"""Padding-free micro-batches: one flattened row per micro-batch gives each example exactly the loss and
gradients it has alone, with the trainer's attention function and with transformers' flash-attention path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer import attention, batching
from kubetune_trainer import data as data_mod
from kubetune_trainer.data import IGNORE, Example


def tiny_qwen2(attn: str = "sdpa") -> Any:
    """Grouped-query attention as in Qwen2.5-0.5B (here 4 query heads share 2 key/value heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, use_cache=False)  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model


def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then the response
        out.append(Example(ids, labels, list(range(n))))
    return out


def token_losses(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of every position t against the label at t+1 (0 where unlabelled), flattened."""
    logits = model(**batch, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0), reduction="none"
    )
    return ce * (labels.reshape(-1) != IGNORE)


def alone(model: Any, exs: list[Example]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Each example in its own forward: per-token losses, and the gradients of their sum."""
    model.zero_grad()
    losses = []
    for e in exs:
        loss = token_losses(
            model, {"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])}
        )
        loss.sum().backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def together(
    model: Any, batch: dict[str, Any], exs: list[Example]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One forward over the collated micro-batch, its per-token losses cut back into examples."""
    model.zero_grad()
    loss = token_losses(model, batch)
    loss.sum().backward()
    flat = loss.detach().reshape(batch["input_ids"].shape[0], -1)
    pieces, row, col = [], 0, 0
    width = batch["input_ids"].shape[1]
    for e in exs:
        n = len(e.input_ids)
        if col + n > width:  # data.collate starts a new row
            row, col = row + 1, 0
        pieces.append(flat[row, col : col + n - 1])
        col += n
    return pieces, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a: tuple[list[torch.Tensor], dict], b: tuple[list[torch.Tensor], dict]) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=2e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- flash-attention on CPU


def _reference_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                     causal: bool = False, window_size: tuple[int, int] = (-1, -1), **_: Any) -> torch.Tensor:  # fmt: skip
    """flash_attn_func's contract (B, T, H, D), computed with SDPA: causal over each whole row."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale,
                                         enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2)


def _reference_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_q: int = 0, max_seqlen_k: int = 0, dropout_p: float = 0.0, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), **_: Any) -> torch.Tensor:  # fmt: skip
    """flash_attn_varlen_func's contract (total, H, D), causal inside each cu_seqlens segment."""
    assert causal
    return attention._sdpa_per_segment(q, k, v, cu_seqlens_q, softmax_scale, None)


@pytest.fixture
def flash_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own flash-attention path (modeling_flash_attention_utils) with CPU stand-ins for the kernels,
    so its choice between the plain and the varlen kernel is what runs."""
    from transformers import modeling_flash_attention_utils as fa

    process = fa._lazy_define_process_function(_reference_flash_varlen)
    monkeypatch.setattr(
        fa,
        "lazy_import_flash_attention",
        lambda *a, **k: (
            (_reference_flash, _reference_flash_varlen, None, fa._pad_input, fa._unpad_input),
            (process, dict),
        ),
    )


LENGTHS = [9, 14, 5, 12, 7, 11]


def trainer_batch(exs: list[Example]) -> dict[str, Any]:
    """What the trainer feeds the model: micro-batches by token budget, each flattened."""
    (group,) = batching.micro_batches(exs, budget=sum(len(e.input_ids) for e in exs))
    return batching.Flatten(max_length=16)([group])


def test_flash_path_leaks_across_examples_in_a_multi_row_packed_batch(flash_on_cpu: None) -> None:
    """The bug the flattened layout fixes: with several rows, transformers' flash path ignores position_ids and
    every packed example attends to the ones before it in its row (with SDPA the same rows are safe)."""
    model = tiny_qwen2("flash_attention_2")
    exs = examples(LENGTHS)
    rows = data_mod.pack(exs, max_len=32)
    assert len(rows) > 1 and any(r.position_ids.count(0) > 1 for r in rows)
    batch = data_mod.collate(rows, pad_id=0, packed=True)
    with torch.no_grad():
        leaked = model(**batch, use_cache=False).logits
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        safe = model(**batch, use_cache=False).logits
    assert (leaked - safe).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["flash_attention_2", attention.ATTN_NAME, "sdpa"])
def test_trainer_batches_give_each_example_its_own_loss_and_gradients(attn: str, flash_on_cpu: None) -> None:
    model = tiny_qwen2(attn)
    if attn == attention.ATTN_NAME:
        assert attention.use(model)
    exs = examples(LENGTHS)
    batch = trainer_batch(exs)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert_same(together(model, batch, exs), alone(model, exs))


def test_packed_rows_flattened_give_each_example_its_own_loss(flash_on_cpu: None) -> None:
    """Packing on: rows from data.pack are split back into their examples by position_ids restarts."""
    model = tiny_qwen2(attention.register())
    exs = examples(LENGTHS, seed=1)
    rows = data_mod.pack(exs, max_len=32)
    batch = batching.Flatten(max_length=32)([rows])
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert_same(together(model, batch, exs), alone(model, exs))


def test_without_varlen_arguments_boundaries_come_from_position_ids_or_the_padding_mask() -> None:
    model = tiny_qwen2(attention.register())
    exs = examples(LENGTHS[:4], seed=2)
    rows = data_mod.pack(exs, max_len=32)
    for batch in (
        data_mod.collate(rows, pad_id=0, packed=True),
        data_mod.collate(exs, pad_id=0, packed=False),
    ):
        got = together(model, batch, exs) if "position_ids" in batch else None
        if got is None:  # padded rows: compare each row's tokens with the example alone
            model.zero_grad()
            logits = model(**batch, use_cache=False).logits
            for row, e in enumerate(exs):
                ref = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[row, : len(e.input_ids)], ref, atol=2e-5, rtol=1e-4)
        else:
            assert_same(got, alone(model, exs))


def test_causal_window_is_a_tuple() -> None:
    """torch 2.11's varlen_attn is causal only when window_size == (-1, 0); a list compares unequal."""
    assert attention.CAUSAL == (-1, 0) and isinstance(attention.CAUSAL, tuple)


def test_micro_batches_fill_the_token_budget() -> None:
    lengths = [int(x) for x in torch.randint(20, 400, (500,), generator=torch.Generator().manual_seed(0))]
    groups = batching.group_by_tokens(lengths, budget=1024, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(500))
    sizes = [sum(lengths[i] for i in g) for g in groups]
    assert max(sizes) <= 1024
    assert sum(lengths) / (len(groups) * 1024) > 0.95  # nearly full: few tokens of budget left over
    assert batching.group_by_tokens(lengths, 1024, seed=3) == groups


def test_an_example_longer_than_max_length_is_refused() -> None:
    with pytest.raises(ValueError, match="maxSeqLength"):
        batching.flatten(examples([20]), max_length=16)
