"""Dataset formats, loss masking token by token, file types, refusals by message, overflow, mixing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_templates import byte_tokenizer
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, StorageSpec, TrainingSpec
from kubetune_trainer import data, formats, masking, records
from kubetune_trainer.errors import TrainerError

CHAT = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "1 2"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "spell"}, {"from": "human", "value": "one two"}, {"from": "gpt", "value": "1 2"},
                              {"from": "human", "value": "three"}, {"from": "gpt", "value": "3"}]}  # fmt: skip
ALPACA = {"instruction": "spell", "input": "one two", "output": "1 2"}
HERE = records.Where("train.jsonl", 0, 1)


def _spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": "/x.jsonl", **kw})


def _tokens(record: dict, tokenizer: Any, **kw: Any) -> tuple[list[int], list[int]]:
    spec = _spec(**kw)
    mapping = formats.resolve(record, HERE, spec.format, spec.fields)
    return masking.tokenize(formats.parse(record, HERE, mapping), tokenizer, HERE)


def _learned(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != data.IGNORE])


def _refusal(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(TrainerError) as err:
        fn(*args, **kw)
    assert err.value.exit_code == ExitCode.DATASET_INVALID
    return err.value.message


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("record", "fmt", "columns"),
    [
        (CHAT, "chat", {"messages": "messages", "role": "role", "content": "content"}),
        (SHAREGPT, "chat", {"messages": "conversations", "role": "from", "content": "value"}),
        (ALPACA, "instruction", {"instruction": "instruction", "response": "output", "input": "input"}),
        (
            {"instruction": "spell", "context": "one", "answer": "1"},
            "instruction",
            {"instruction": "instruction", "response": "answer", "input": "context"},
        ),
        (
            {"prompt": "one two :", "completion": "1 2"},
            "prompt_completion",
            {"prompt": "prompt", "completion": "completion"},
        ),
        ({"text": "one two 1 2"}, "text", {"text": "text"}),
        (
            {"prompt": "one", "chosen": "1", "rejected": "2"},
            "preference",
            {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        ),
    ],
)
def test_auto_detects_format_and_columns(record: dict, fmt: str, columns: dict) -> None:
    mapping = formats.resolve(record, HERE, "auto", _spec().fields)
    assert (mapping.format, mapping.columns) == (fmt, columns)


def test_chat_learns_assistant_tokens_through_eos_only(tokenizer: Any) -> None:
    ids, labels = _tokens(CHAT, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    learned = [t if label != data.IGNORE else None for t, label in zip(tokens, labels, strict=True)]
    assert tokens == ["<|user|>", "one", "two", "<|end|>", "<|assistant|>", "1", "2", "<|end|>"]
    assert learned == [None, None, None, None, None, "1", "2", "<|end|>"]


def test_sharegpt_multi_turn_learns_every_gpt_turn(tokenizer: Any) -> None:
    ids, labels = _tokens(SHAREGPT, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    learned = [t for t, label in zip(tokens, labels, strict=True) if label != data.IGNORE]
    assert tokens[:3] == ["<|system|>", "spell", "<|end|>"]
    assert learned == ["1", "2", "<|end|>", "3", "<|end|>"]
    assert labels[tokens.index("three")] == data.IGNORE


def test_custom_message_keys_and_role_names(tokenizer: Any) -> None:
    record = {"dialog": [{"speaker": "client", "text": "one two"}, {"speaker": "bot", "text": "1 2"}]}
    fields = {
        "messages": "dialog",
        "role": "speaker",
        "content": "text",
        "roles": {"client": "user", "bot": "assistant"},
    }
    ids, labels = _tokens(record, tokenizer, format="chat", fields=fields)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|>"


def test_alpaca_learns_only_the_output(tokenizer: Any) -> None:
    ids, labels = _tokens(ALPACA, tokenizer)
    assert _learned(tokenizer, ids, labels) == "1 2 <|end|>"
    assert "spell" in tokenizer.decode(ids) and "one two" in tokenizer.decode(ids)


def test_prompt_completion_learns_only_the_completion(tokenizer: Any) -> None:
    ids, labels = _tokens({"prompt": "one two", "completion": "1 2"}, tokenizer)
    assert labels[:2] == [data.IGNORE] * 2 and _learned(tokenizer, ids, labels) == "1 2 <|end|>"


def test_text_learns_every_token(tokenizer: Any) -> None:
    ids, labels = _tokens({"text": "one two 1 2"}, tokenizer)
    assert labels == ids


def test_preference_pairs_share_the_prompt_and_learn_each_response(tokenizer: Any) -> None:
    record = {
        "prompt": "one two",
        "chosen": " 1 2",
        "rejected": " 2 1",
    }  # text pairs join as written (TRL's standard format)
    sample = formats.parse(record, HERE, formats.resolve(record, HERE, "auto", _spec().fields))
    (chosen, chosen_labels), (rejected, rejected_labels) = masking.tokenize_preference(sample, tokenizer)
    assert (
        _learned(tokenizer, chosen, chosen_labels) == "1 2 <|end|>"
        and _learned(tokenizer, rejected, rejected_labels) == "2 1 <|end|>"
    )
    assert chosen[:2] == rejected[:2] == tokenizer("one two")["input_ids"]  # the same prompt
    assert masking.tokenize(sample, tokenizer) == (
        chosen,
        chosen_labels,
    )  # supervised tuning learns the chosen one


# ---------------------------------------------------------------- templates


CHATML = byte_tokenizer(
    ["<|im_start|>", "<|im_end|>"], "<|im_end|>",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
)  # fmt: skip
LLAMA3 = byte_tokenizer(
    ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
)  # fmt: skip


@pytest.mark.parametrize(
    ("tok", "eos"), [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")], ids=["chatml", "llama3"]
)
def test_learned_span_ends_at_eos_and_what_follows_is_not_learned(tok: Any, eos: str) -> None:
    record = {
        "messages": CHAT["messages"]
        + [{"role": "user", "content": "three"}, {"role": "assistant", "content": "3"}]
    }
    ids, labels = _tokens(record, tok)
    spans, current = [], []
    for i, label in zip(ids + [-1], labels + [data.IGNORE], strict=True):
        if label != data.IGNORE:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == [
        "1 2" + eos,
        "3" + eos,
    ]  # every turn, through EOS; ChatML's newline after EOS is not learned
    rendered = tok.decode(ids)
    assert rendered.endswith(eos + "\n") if tok is CHATML else rendered.endswith(eos)


def test_exact_match_compares_up_to_eos() -> None:
    eos = CHATML.eos_token_id
    (example,) = [data.Example(*_tokens(CHAT, CHATML), position_ids=[])]
    ((prompt, reference),) = data.generation_pairs([example])
    assert reference[-1] == eos and CHATML.decode(reference) == "1 2<|im_end|>"
    generated = reference + CHATML("\nmore")["input_ids"]  # what generation may run on to
    assert data.upto_eos(generated, eos) == data.upto_eos(reference, eos)


# ---------------------------------------------------------------- refusals


def test_explicit_format_that_does_not_fit_names_columns_and_the_fix() -> None:
    message = _refusal(formats.resolve, {"dialog": [], "id": 1}, HERE, "chat", _spec().fields)
    assert message.startswith(
        "train.jsonl line 1 (record 0): format chat needs messages ('messages' or 'conversations')"
    )
    assert "['dialog', 'id']" in message and "spec.dataset.fields.messages" in message


def test_mismatch_with_one_spare_column_names_the_exact_setting() -> None:
    message = _refusal(
        formats.resolve, {"instruction": "a", "reply": "b"}, HERE, "instruction", _spec().fields
    )
    assert "format instruction needs response ('output' or 'response' or 'answer')" in message
    assert message.endswith("set spec.dataset.fields.response: reply")


def test_undetectable_records_list_columns_and_formats() -> None:
    message = _refusal(formats.resolve, {"foo": 1}, HERE, "auto", _spec().fields)
    assert (
        "cannot detect the dataset format from columns ['foo']" in message
        and "spec.dataset.fields" in message
    )


def test_message_keys_that_do_not_fit_name_the_keys_found() -> None:
    record = {"messages": [{"speaker": "user", "value": "x"}]}
    message = _refusal(formats.resolve, record, HERE, "chat", _spec().fields)
    assert "have keys ['speaker', 'value'], none of them 'role' or 'from'" in message
    assert message.endswith("set spec.dataset.fields.role: speaker")


def test_unknown_role_names_the_role_and_the_mapping() -> None:
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}
    mapping = formats.resolve(record, HERE, "auto", _spec().fields)
    message = _refusal(formats.parse, record, HERE, mapping)
    assert "train.jsonl line 1 (record 0): message 1 has role 'bot', which is not mapped" in message
    assert "gpt->assistant" in message and "roles: {bot: assistant}" in message


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _source(path: Path, tokenizer: Any, **kw: Any) -> tuple[list[data.Example], data.SourceReport]:
    spec = _spec(**kw)
    return data.tokenize_source(path, path.name, spec.format, spec.fields, spec, tokenizer)


def test_bad_json_names_file_line_and_record(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + json.dumps(CHAT) + "\n{not json\n")
    assert _refusal(_source, path, tokenizer).startswith("t.jsonl line 4 (record 2) column 2: not valid JSON")


def test_a_record_that_is_not_an_object_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    message = _refusal(_source, _jsonl(tmp_path / "t.jsonl", [5]), tokenizer)
    assert message.startswith("t.jsonl line 1 (record 0): a record must be an object") and "int 5" in message


def test_record_larger_than_max_record_bytes_is_refused_without_reading_it_whole(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [CHAT, {"text": "one " * 1000}])
    message = _refusal(_source, path, tokenizer, maxRecordBytes=1024)
    assert message.startswith(
        "t.jsonl line 2 (record 1) is larger than spec.dataset.maxRecordBytes (1024 bytes)"
    )


def test_missing_and_empty_responses_are_counted_and_refused_by_default(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [ALPACA] * 7 + [{"instruction": "x", "input": "", "output": ""}, {"instruction": "x", "input": ""},
                           {"messages": "ignored", "instruction": "x", "output": None}]  # fmt: skip
    path = _jsonl(tmp_path / "t.jsonl", rows)
    message = _refusal(_source, path, tokenizer)
    assert message.startswith(
        "3 of 10 records in t.jsonl are invalid (2 missing cell, 1 empty response), more than spec.dataset.maxInvalidFraction 0"
    )
    assert "t.jsonl line 9 (record 8): no value in column 'output'" in message
    assert message.endswith("spec.dataset.maxInvalidFraction: 0.3")
    examples, report = _source(path, tokenizer, maxInvalidFraction=0.3)
    assert (len(examples), report.records, dict(report.invalid)) == (
        7,
        10,
        {"empty response": 1, "missing cell": 2},
    )


def test_null_assistant_content_is_an_empty_response(tmp_path: Path, tokenizer: Any) -> None:
    rows = [CHAT, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}]
    assert "1 empty response" in _refusal(_source, _jsonl(tmp_path / "t.jsonl", rows), tokenizer)


def test_missing_csv_cells_are_not_the_string_none(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\n"one, two",1 2\nthree\n')
    message = _refusal(_source, path, tokenizer)
    assert "t.csv line 3 (record 1): no value in column 'completion'" in message


def test_ragged_csv_rows_are_a_dataset_error(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\none,1,extra\n")
    assert _refusal(_source, path, tokenizer).startswith(
        "t.csv line 2 (record 0) has 3 cells but the header has 2"
    )


def test_too_little_data_for_one_global_batch_is_refused() -> None:
    training = TrainingSpec(perDeviceBatchSize=4)
    message = _refusal(data.check_batch, 7, training, 2, 1)
    assert message.startswith(
        "7 training sequences, fewer than one optimizer step needs (8 = perDeviceBatchSize 4 x 2 processes x 1 accumulation)"
    )
    data.check_batch(8, training, 2, 1)


# ---------------------------------------------------------------- overflow


def test_overflow_truncate_drop_error(tmp_path: Path, tokenizer: Any) -> None:
    long = {"prompt": "one " * 10, "completion": "1 " * 10}
    path = _jsonl(tmp_path / "t.jsonl", [long, {"prompt": "one", "completion": "1"}])
    examples, report = _source(path, tokenizer, maxSeqLength=16)
    assert [len(e.input_ids) for e in examples] == [16, 3]
    assert (report.truncated, report.truncated_tokens, report.lengths) == (1, 21 - 16, [21, 3])
    examples, report = _source(path, tokenizer, maxSeqLength=16, overflow="drop")
    assert (len(examples), report.dropped, report.dropped_tokens) == (1, 1, 21)
    message = _refusal(_source, path, tokenizer, maxSeqLength=16, overflow="error")
    assert message.startswith("t.jsonl line 1 (record 0): 21 tokens, more than spec.dataset.maxSeqLength 16")


def test_truncation_that_cuts_every_learned_token_drops_the_example(tmp_path: Path, tokenizer: Any) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl",
        [{"prompt": "one " * 20, "completion": "1"}, {"prompt": "one", "completion": "1"}],
    )
    examples, report = _source(path, tokenizer, maxSeqLength=16)
    assert (len(examples), report.dropped) == (1, 1)


def test_overflow_counts_reach_the_report_and_the_log(tmp_path: Path, tokenizer: Any) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl",
        [{"prompt": "one " * 10, "completion": "1 " * 10}] + [{"prompt": "one", "completion": "1"}] * 3,
    )
    spec = _spec(train=str(path), maxSeqLength=16)
    built = data.build(spec, StorageSpec(), tokenizer, seed=1)
    report = built.report()
    assert (report["truncated"], report["truncatedTokens"], report["overflowShare"]) == (1, 5, 0.25)
    assert any(
        line.startswith("overflow (truncate, maxSeqLength 16): 1 examples truncated (5 tokens cut)")
        for line in data.report_lines(report, spec)
    )


def test_overflow_above_one_percent_reaches_status_progress(tmp_path: Path, tokenizer: Any) -> None:
    from kubetune.status.progress import to_progress

    short = [{"prompt": "one", "completion": "1"}]
    spec = _spec(
        train=str(
            _jsonl(tmp_path / "t.jsonl", [{"prompt": "one " * 10, "completion": "1 " * 10}] + short * 99)
        ),
        maxSeqLength=16,
    )
    warning = data.data_warning(data.build(spec, StorageSpec(), tokenizer, seed=1).report(), spec)
    assert warning is None  # exactly 1%: not above
    spec = _spec(
        train=str(
            _jsonl(tmp_path / "u.jsonl", [{"prompt": "one " * 10, "completion": "1 " * 10}] * 2 + short * 98)
        ),
        maxSeqLength=16,
    )
    warning = data.data_warning(data.build(spec, StorageSpec(), tokenizer, seed=1).report(), spec)
    assert (
        warning
        == "2.0% of examples longer than maxSeqLength 16 (2 truncated, 0 dropped; overflow: truncate); see metrics.json data"
    )
    assert to_progress({"step": 1, "dataWarning": warning}, "now").data_warning == warning


# ---------------------------------------------------------------- files and mixing


def _write_all_types(tmp: Path, rows: list[dict]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {
        "jsonl": _jsonl(tmp / "d.jsonl", rows),
        "json": tmp / "d.json",
        "csv": tmp / "d.csv",
        "tsv": tmp / "d.tsv",
        "parquet": tmp / "d.parquet",
    }
    out["json"].write_text(json.dumps(rows, indent=1))
    for kind, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(out[kind], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), out["parquet"])
    return out


def save_to_disk_layout(directory: Path, rows: list[dict]) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards named by state.json."""
    import pyarrow as pa

    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = []
    for i, part in enumerate((table.slice(0, 1), table.slice(1))):
        names.append(f"data-{i:05d}-of-00002.arrow")
        with (
            pa.OSFile(str(directory / names[-1]), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(part)
    (directory / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"})
    )
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return directory


ROWS = [{"prompt": 'one, "two"', "completion": "1 2 ü"}, {"prompt": "two", "completion": "2"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_reads_each_file_type(tmp_path: Path, kind: str) -> None:
    assert [r for _, r in records.iter_records(_write_all_types(tmp_path, ROWS)[kind], 1 << 20)] == ROWS


def test_reads_a_directory_of_shards_and_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    _write_all_types(tmp_path / "shards", ROWS)
    assert len(list(records.iter_records(tmp_path / "shards", 1 << 20))) == 10
    saved = save_to_disk_layout(tmp_path / "saved" / "train", ROWS)
    (saved.parent / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert [r for _, r in records.iter_records(saved.parent, 1 << 20)] == ROWS


def test_unsupported_and_empty_directories_list_what_is_supported(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("x")
    message = _refusal(lambda: list(records.iter_records(tmp_path, 1024)))
    assert "no dataset files under" in message and "JSON arrays (.json)" in message


def test_sources_mix_with_weights_and_their_own_formats(tmp_path: Path, tokenizer: Any) -> None:
    alpaca = _jsonl(tmp_path / "a.jsonl", [ALPACA] * 10)
    share = _jsonl(tmp_path / "s.jsonl", [SHAREGPT] * 4)
    spec = DatasetSpec.model_validate(
        {"sources": [{"path": str(alpaca), "weight": 0.5}, {"path": str(share), "weight": 2}]}
    )
    built = data.build(spec, StorageSpec(), tokenizer, seed=1)
    learned = [_learned(tokenizer, e.input_ids, e.labels) for e in built.train]
    assert learned.count("1 2 <|end|>") == 5 and learned.count("1 2 <|end|> 3 <|end|>") == 8
    assert [s["format"] for s in built.report()["sources"]] == ["instruction", "chat"]


def test_train_and_sources_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exactly one of spec.dataset.train"):
        DatasetSpec.model_validate({"train": "/a.jsonl", "sources": [{"path": "/b.jsonl"}]})
    with pytest.raises(ValueError, match="exactly one of spec.dataset.train"):
        DatasetSpec.model_validate({})


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
        together = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    torch.testing.assert_close(together[6:], alone, atol=1e-5, rtol=1e-4)


def test_padding_batches_carry_attention_mask() -> None:
    batch = data.collate(
        [data.Example([1, 2, 3], [1, 2, 3], [0, 1, 2]), data.Example([4], [4], [0])], pad_id=0, packed=False
    )
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist()[1] == [4, -100, -100]


def test_eval_split_is_deterministic_and_disjoint() -> None:
    examples = [data.Example([i], [i], [0]) for i in range(100)]
    train, evals = data.split_eval(examples, 0.1, seed=3)
    train2, evals2 = data.split_eval(examples, 0.1, seed=3)
    assert len(evals) == 10 and len(train) == 90
    assert [e.input_ids for e in evals] == [e.input_ids for e in evals2]
    assert not {e.input_ids[0] for e in evals} & {e.input_ids[0] for e in train}
