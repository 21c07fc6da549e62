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


def _pairs(tmp_path: Path, records: list[dict], tokenizer: Any) -> list[dpo.PairExample]:
    import json

    from kubetune.api.models import FieldMapping

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dpo.tokenize_source_pairs(
        path, str(path), "auto", FieldMapping(), DatasetSpec(train="/d", maxSeqLength=64), tokenizer
    )


def _learned(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != dpo.IGNORE]


def test_text_and_conversation_prompts_become_two_sequences_with_one_prompt(
    tmp_path: Path, tokenizer: Any
) -> None:
    chat = {"prompt": [{"role": "user", "content": "one one"}], "chosen": "1 1", "rejected": "3"}
    text, conversation = _pairs(tmp_path, [TRL_RECORDS[0], chat], tokenizer)
    for pair, chosen, rejected in ((text, "7 0 2 9", "7 0 2 8"), (conversation, "1 1", "3")):
        assert chosen in tokenizer.decode(_learned(pair.chosen_ids, pair.chosen_labels))
        assert rejected in tokenizer.decode(_learned(pair.rejected_ids, pair.rejected_labels))
        start = pair.chosen_labels.index(next(x for x in pair.chosen_labels if x != dpo.IGNORE))
        assert pair.chosen_ids[:start] == pair.rejected_ids[:start]  # the same prompt before both replies
    assert "one one" in tokenizer.decode(conversation.chosen_ids)


def test_records_without_rejected_are_refused_naming_the_format(tmp_path: Path, tokenizer: Any) -> None:
    from kubetune_trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="rejected"):
        _pairs(tmp_path, [{"prompt": "x", "chosen": "y"}], tokenizer)


def test_collated_pairs_stack_chosen_then_rejected(tmp_path: Path, tokenizer: Any) -> None:
    pairs = _pairs(tmp_path, RECORDS[:2], tokenizer)
    batch = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    row = batch["labels"][2]  # the first pair's rejected reply
    assert row[row != dpo.IGNORE].tolist() == _learned(pairs[0].rejected_ids, pairs[0].rejected_labels)
    assert batch["attention_mask"][1].sum() == len(pairs[1].chosen_ids)


def test_truncation_drops_a_pair_whose_reply_is_cut_away() -> None:
    pair = dpo.PairExample([1, 2, 3, 4], [-100, -100, 3, 4], [1, 2, 5], [-100, -100, 5])
    assert dpo.truncate(pair, 4) == pair
    assert dpo.truncate(pair, 2) is None


@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)]
)
def test_loss_matches_trl_dpo_trainer_on_the_same_batch(
    tmp_path: Path, tokenizer: Any, loss_type: str, smoothing: float
) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    policy, reference = _model(seed=1), _model()
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], label_smoothing=smoothing, use_cpu=True, bf16=False, fp16=False,
                         report_to=[], per_device_train_batch_size=4, max_length=32, dataloader_drop_last=False)  # fmt: skip
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(TRL_RECORDS),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    # The same batch, scored by our code with the same two models.
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, dpo.IGNORE)}  # fmt: skip
    plain_policy, plain_reference = _model(seed=1), _model()
    out = dpo.dpo_forward(
        plain_policy, plain_reference, ours, DpoSpec(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    )
    assert abs(out.loss.item() - expected.item()) < 1e-5, (out.loss.item(), expected.item())
    assert not (
        batch["completion_mask"][:, 0] == 1
    ).any()  # every row has a prompt: TRL tokenized the pairs as meant
    assert (
        abs(out.loss.item() - float(torch.log(torch.tensor(2.0)))) > 1e-3
    )  # the policy really differs from the reference


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


# ---------------------------------------------------------------- two ranks


def preference_file(directory: Path, n: int = 256) -> Path:
    """spell-digits as preferences: the digits are chosen, echoing the words rejected (the prompt as a
    conversation, as TRL's conversational preference records have it)."""
    import json

    from trainer_helpers import SPELL

    out = directory / "pairs.jsonl"
    lines = []
    for line in SPELL.joinpath("train.jsonl").read_text().splitlines()[:n]:
        user, answer = json.loads(line)["messages"]
        lines.append(json.dumps({"prompt": [user], "chosen": answer["content"], "rejected": user["content"]}))
    out.write_text("\n".join(lines) + "\n")
    return out


DPO_CASES = {
    # LoRA: the reference is the same weights with the adapter off.
    "lora": {"method": "lora"},
    # Full fine-tuning against a frozen copy, with the learning-rate controls: layer-wise decay, the head's
    # own rate, NEFTune noise on the embeddings.
    "full-lr-controls": {"method": "full", "lora": None, "training.learningRate": 0.004, "training.layerLrDecay": 0.8,
                         "training.headLearningRate": 0.006, "training.neftuneAlpha": 5.0},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_on_two_ranks_learns_the_preferences(tmp_path: Path, case: str) -> None:
    import json

    from trainer_helpers import job_spec, rank_dumps, run_trainer

    overrides = {k: v for k, v in DPO_CASES[case].items() if v is not None}
    data = preference_file(tmp_path)
    spec = job_spec(
        tmp_path, objective="dpo", dpo={"beta": 0.1}, **{"training.learningRate": 0.005, **overrides}
    )
    spec["dataset"] = {"train": str(data), "evalSplit": 0.125, "maxSeqLength": 32}
    if "lora" in DPO_CASES[case] and DPO_CASES[case]["lora"] is None:
        spec.pop("lora")
    if case == "lora":  # preempted at step 12 (checkpoint), then resumed: the same checkpoints as SFT
        code, out = run_trainer(tmp_path, spec, env={"KUBETUNE_DEBUG_STOP_AT_STEP": "12"})
        assert code == 143, out[-4000:]
    code, out = run_trainer(tmp_path, spec)
    assert code == 0, out[-4000:]
    if case == "lora":
        assert "resumed from checkpoint step 12" in out
    ranks = rank_dumps(tmp_path)
    assert [r["worldSize"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    curve = ranks[0]["lossCurve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20, 25, 30]  # the curve carries over a resume
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"], [p["loss"] for p in curve]
    accuracy = [p["rewardAccuracy"] for p in curve]
    assert accuracy[-1] > accuracy[0] and accuracy[-1] > 0.9, accuracy
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and metrics["rewardAccuracy"] == accuracy[-1]
    assert metrics["evalRewardAccuracyAfter"] > 0.9  # held-out pairs too
    if case != "lora":  # the before-training evaluation runs at step 0 only, not in a resumed run
        assert (
            metrics["evalRewardAccuracyBefore"] < 0.9 and metrics["evalLossAfter"] < metrics["evalLossBefore"]
        )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out" / "model")
    )  # merged (LoRA) or full weights load
