"""Dataset formats, loss masking, packing boundaries, file types."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.errors import TrainerError

CHAT = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "1 2"}]}


def _spec(**kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": "/x.jsonl", **kw})


def _learned(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != data.IGNORE])


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (CHAT, "chat"),
        ({"instruction": "spell", "input": "one two", "response": "1 2"}, "instruction"),
        ({"prompt": "one two :", "completion": "1 2"}, "prompt_completion"),
        ({"text": "one two 1 2"}, "text"),
    ],
)
def test_auto_detects_each_format(record: dict, fmt: str) -> None:
    assert data.detect_format(record, _spec()) == fmt


def test_chat_loss_only_on_assistant_tokens(tokenizer) -> None:
    ids, labels = data.tokenize_record(CHAT, "chat", _spec(), tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|>"
    assert tokenizer.decode(ids).startswith("<|user|> one two")


def test_multi_turn_chat_learns_every_assistant_turn(tokenizer) -> None:
    record = {"messages": CHAT["messages"] + [{"role": "user", "content": "three"}, {"role": "assistant", "content": "3"}]}
    ids, labels = data.tokenize_record(record, "chat", _spec(), tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|> 3 <|end|>"


def test_instruction_loss_only_on_response(tokenizer) -> None:
    record = {"instruction": "spell", "input": "one two", "response": "1 2"}
    ids, labels = data.tokenize_record(record, "instruction", _spec(), tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|>"
    assert "spell" in tokenizer.decode(ids) and "one two" in tokenizer.decode(ids)


def test_prompt_completion_loss_only_on_completion(tokenizer) -> None:
    ids, labels = data.tokenize_record({"prompt": "one two :", "completion": "1 2"}, "prompt_completion", _spec(), tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|>"
    assert labels[:3] == [data.IGNORE] * 3


def test_text_learns_every_token(tokenizer) -> None:
    ids, labels = data.tokenize_record({"text": "one two 1 2"}, "text", _spec(), tokenizer)
    assert labels == ids


def test_custom_field_names(tokenizer) -> None:
    spec = _spec(fields={"prompt": "q", "completion": "a"})
    assert data.detect_format({"q": "one", "a": "1"}, spec) == "prompt_completion"
    ids, labels = data.tokenize_record({"q": "one", "a": "1"}, "prompt_completion", spec, tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 <|end|>"


def test_undetectable_records_are_a_dataset_error() -> None:
    with pytest.raises(TrainerError) as err:
        data.detect_format({"foo": 1}, _spec())
    assert err.value.exit_code == ExitCode.DATASET_INVALID
    assert "foo" in err.value.message


def test_truncates_to_max_seq_length(tokenizer) -> None:
    long = {"text": " ".join(["one"] * 100)}
    (example,) = data.tokenize_all([long], _spec(maxSeqLength=16), tokenizer)
    assert len(example.input_ids) == 16


def test_packing_resets_positions_and_unlabels_each_first_token() -> None:
    a = data.Example([1, 2, 3], [-100, 2, 3], [0, 1, 2])
    b = data.Example([4, 5], [4, 5], [0, 1])
    c = data.Example([6, 7, 8], [-100, 7, 8], [0, 1, 2])
    packed = data.pack([a, b, c], max_len=6)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert packed[0].position_ids == [0, 1, 2, 0, 1]
    assert packed[0].labels == [-100, 2, 3, -100, 5]


def test_packed_examples_do_not_attend_across_boundaries(tokenizer) -> None:
    """Logits of an example inside a packed row equal its logits alone: no cross-contamination.

    The trainer calls the model with use_cache=False, as here: with a KV cache transformers ignores the
    packing in position_ids and the second example would attend to the first.
    """
    from trainer_helpers import TINY_MODEL
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)).eval()
    first = data.Example([2, 9, 7, 5, 3, 19], [-100] * 6, list(range(6)))
    second = data.Example([2, 10, 8, 11, 5, 3, 20, 18], [-100] * 8, list(range(8)))
    (packed,) = data.pack([first, second], max_len=32)
    batch = data.collate([packed], pad_id=0, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    torch.testing.assert_close(together[6:], alone, atol=1e-5, rtol=1e-4)


def test_padding_batches_carry_attention_mask() -> None:
    batch = data.collate([data.Example([1, 2, 3], [1, 2, 3], [0, 1, 2]), data.Example([4], [4], [0])], pad_id=0, packed=False)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist()[1] == [4, -100, -100]


def test_eval_split_is_deterministic_and_disjoint() -> None:
    examples = [data.Example([i], [i], [0]) for i in range(100)]
    train, evals = data.split_eval(examples, 0.1, seed=3)
    train2, evals2 = data.split_eval(examples, 0.1, seed=3)
    assert len(evals) == 10 and len(train) == 90
    assert [e.input_ids for e in evals] == [e.input_ids for e in evals2]
    assert not {e.input_ids[0] for e in evals} & {e.input_ids[0] for e in train}


def _write_all_types(tmp: Path, rows: list[dict]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp / "d.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    parquet = tmp / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return {"jsonl": jsonl, "csv": csv_path, "parquet": parquet}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_reads_jsonl_csv_parquet(tmp_path: Path, kind: str) -> None:
    rows = [{"prompt": "one", "completion": "1"}, {"prompt": "two", "completion": "2"}]
    assert data.read_records(_write_all_types(tmp_path, rows)[kind]) == rows


def test_reads_a_directory_of_files(tmp_path: Path) -> None:
    _write_all_types(tmp_path, [{"text": "one"}])
    assert len(data.read_records(tmp_path)) == 3


def test_corrupt_file_is_a_dataset_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{not json\n')
    with pytest.raises(TrainerError) as err:
        data.read_records(bad)
    assert err.value.exit_code == ExitCode.DATASET_INVALID


def test_generation_pairs_split_prompt_and_reference(tokenizer) -> None:
    (example,) = data.tokenize_all([CHAT], _spec(), tokenizer)
    ((prompt, reference),) = data.generation_pairs([example])
    assert tokenizer.decode(prompt).endswith("<|assistant|>")
    assert tokenizer.decode(reference) == "1 2 <|end|>"
