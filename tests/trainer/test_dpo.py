"""DPO: preference records to pairs, the loss against TRL's DPOTrainer on the same batch, the
reference as the adapters-off base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api.models import DatasetSpec, DpoSpec
from kubetune_trainer import dpo
from trainer_helpers import TINY_MODEL

RECORDS = [
    {"prompt": "seven zero two nine", "chosen": "7 0 2 9", "rejected": "7 0 2 8"},
    {"prompt": "one one", "chosen": "1 1", "rejected": "3"},
    {"prompt": "four", "chosen": "4", "rejected": "4 4 4 4"},
    {"prompt": "two six eight", "chosen": "2 6 8", "rejected": "8 6 2"},
]

# TRL joins prompt and reply text as they are: a leading space keeps the word-level tokens apart.
TRL_RECORDS = [{**r, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in RECORDS]


def _model(seed: int | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    if seed is not None:  # a policy that has moved away from the reference
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def test_text_and_chat_records_become_prompt_and_reply_tokens(tokenizer: Any) -> None:
    spec = DatasetSpec(train="/d")
    text = dpo.tokenize_pair(RECORDS[0], spec, tokenizer)
    assert tokenizer.decode(text.prompt_ids) == "seven zero two nine"
    assert text.chosen_ids[-1] == tokenizer.eos_token_id and text.chosen_ids[:-1] != text.rejected_ids[:-1]
    chat = {"messages": [{"role": "user", "content": "one one"}], "chosen": [{"role": "assistant", "content": "1 1"}], "rejected": "3"}
    pair = dpo.tokenize_pair(chat, spec, tokenizer)
    rendered = tokenizer.apply_chat_template([*chat["messages"], {"role": "assistant", "content": "1 1"}], tokenize=False)
    assert "".join(tokenizer.decode(pair.prompt_ids + pair.chosen_ids).split()) == "".join(rendered.split())
    assert "1" in tokenizer.decode(pair.chosen_ids) and "3" in tokenizer.decode(pair.rejected_ids)


def test_a_record_without_rejected_names_the_columns(tokenizer: Any) -> None:
    from kubetune_trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="'chosen' and 'rejected'"):
        dpo.tokenize_pair({"prompt": "x", "chosen": "y"}, DatasetSpec(train="/d"), tokenizer)


def test_collated_pairs_label_only_the_replies(tokenizer: Any) -> None:
    pairs = dpo.tokenize_pairs(RECORDS[:2], DatasetSpec(train="/d"), tokenizer)
    batch = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    row = batch["labels"][2]  # the first pair's rejected reply
    assert row[row != dpo.IGNORE].tolist() == pairs[0].rejected_ids
    assert batch["attention_mask"][1].sum() == len(pairs[1].prompt_ids) + len(pairs[1].chosen_ids)


def test_truncation_keeps_the_reply_start_and_the_prompt_end() -> None:
    pair = dpo.truncate(dpo.PairExample(list(range(10)), [20, 21, 22], [30]), 8)
    assert pair == dpo.PairExample(list(range(5, 10)), [20, 21, 22], [30])


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_loss_matches_trl_dpo_trainer_on_the_same_batch(tmp_path: Path, tokenizer: Any, loss_type: str, smoothing: float) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    policy, reference = _model(seed=1), _model()
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], label_smoothing=smoothing, use_cpu=True, bf16=False, fp16=False,
                         report_to=[], per_device_train_batch_size=4, max_length=32, dataloader_drop_last=False)  # fmt: skip
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(TRL_RECORDS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    # The same batch, scored by our code with the same two models.
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, dpo.IGNORE)}  # fmt: skip
    plain_policy, plain_reference = _model(seed=1), _model()
    out = dpo.dpo_forward(plain_policy, plain_reference, ours, DpoSpec(beta=0.3, loss_type=loss_type, label_smoothing=smoothing))
    assert abs(out.loss.item() - expected.item()) < 1e-5, (out.loss.item(), expected.item())
    assert not (batch["completion_mask"][:, 0] == 1).any()  # every row has a prompt: TRL tokenized the pairs as meant
    assert abs(float(out.loss) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # the policy really differs from the reference


def test_with_an_adapter_the_reference_is_the_base_with_adapters_off() -> None:
    from kubetune.api.models import LoraSpec
    from kubetune_trainer.peft_methods import lora_config
    from peft import get_peft_model

    model = get_peft_model(_model(), lora_config(LoraSpec(r=4)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # the adapter now changes the output
    ref = dpo.reference_for(True, DpoSpec(), model, None)
    assert ref is not None
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).logits, _model()(input_ids=ids).logits, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, _model()(input_ids=ids).logits, atol=1e-3)
    assert dpo.reference_for(True, DpoSpec(reference_model="none"), model, None) is None


def test_reward_statistics_count_pairs_ranked_right() -> None:
    out = dpo.DpoOutput(torch.tensor(0.5), torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert out.stats().tolist() == [3.0, 1.0, -1.0, 2.0, 3.0]
