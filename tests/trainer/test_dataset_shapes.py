"""Datasets as they are published: compressed and plain-text files, spreadsheet headers, OpenAI chat with
weights and tool calls, preference pairs in TRL's and HH-RLHF's shapes (token ids compared with TRL's),
and each refusal by its message."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_templates import llama31, qwen25
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, FieldMapping, StorageSpec
from kubetune_trainer import data, dpo, formats, masking, records
from kubetune_trainer.errors import TrainerError
from trainer_helpers import TINY_MODEL

ROWS = [{"prompt": "one two", "completion": "1 2"}, {"prompt": "three", "completion": "3 ü"}]
HERE = records.Where("train.jsonl", 0, 1)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


def _refusal(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(TrainerError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == ExitCode.DATASET_INVALID
    return info.value.message


def _read(path: Path, limit: int = 1 << 20) -> list[Any]:
    return [r for _, r in records.iter_records(path, limit)]


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows: list[dict[str, str]], delimiter: str = ",") -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _zst(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


# ---------------------------------------------------------------- compressed and plain-text files


@pytest.mark.parametrize(
    "name, raw, pack",
    [("train.jsonl.gz", _jsonl(ROWS), gzip.compress), ("train.json.gz", json.dumps(ROWS).encode(), gzip.compress),
     ("train.csv.bz2", _csv(ROWS), bz2.compress), ("train.tsv.xz", _csv(ROWS, "\t"), lzma.compress),
     ("train.jsonl.zst", _jsonl(ROWS), _zst), ("train.json.zst", json.dumps(ROWS).encode(), _zst)],
)  # fmt: skip
def test_compressed_files_read_as_their_plain_type(tmp_path: Path, name: str, raw: bytes, pack: Any) -> None:
    (tmp_path / name).write_bytes(pack(raw))
    assert _read(tmp_path / name) == ROWS


def test_a_shard_directory_reads_every_shard_and_refuses_one_it_cannot_read_by_name(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_bytes(_jsonl(ROWS))
    (shards / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(ROWS)))  # the shard that used to be skipped
    pq.write_table(pa.Table.from_pylist(ROWS), shards / "c.parquet")
    (shards / "README.md").write_text("# docs are passed over\n")
    assert len(_read(shards)) == 6
    (shards / "d.xlsx").write_bytes(b"PK")
    message = _refusal(_read, shards)
    assert (
        "1 file(s) that are not dataset files, first d.xlsx: .xlsx is not a type kubetune reads: save it as CSV"
        in message
    )
    assert "a shard is never skipped" in message


@pytest.mark.parametrize(
    "name, fix",
    [("train.zip", "extract it (unzip)"), ("train.parquet.gz", ".parquet files compress inside themselves: decompress it to plain .parquet"),
     ("data.tar.gz", "extract it (tar xf)"), ("train.xlsx", "save it as CSV"), ("train.yaml", "convert it to JSONL (one JSON object per line)")],
)  # fmt: skip
def test_a_refused_type_names_the_conversion_that_works(tmp_path: Path, name: str, fix: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    assert fix in _refusal(_read, tmp_path / name)


def test_a_decompression_bomb_is_refused_before_it_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "train.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as out:  # 64 MiB of one line in 64 KiB on disk
        for _ in range(64):
            out.write(b"0" * (1 << 20))
    tracemalloc.start()
    try:
        message = _refusal(_read, bomb, 1 << 20)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert (
        message
        == "train.jsonl.gz line 1 (record 0) is larger than spec.dataset.maxRecordBytes (1048576 bytes); split the record or raise maxRecordBytes"
    )
    assert peak < 8 << 20  # the limit applies to decompressed bytes, read a line at a time
    blank = tmp_path / "blank.jsonl.gz"
    blank.write_bytes(
        gzip.compress(b"\n" * (8 << 20))
    )  # nothing but empty lines: no record is ever too large
    monkeypatch.setattr(records, "EXPANSION_FLOOR", 1 << 20)
    message = _refusal(_read, blank)
    assert (
        message.startswith("dataset file blank.jsonl.gz expands to more than 1 MiB")
        and "decompression bomb" in message
    )


def test_a_damaged_compressed_file_is_refused_with_the_last_good_record(tmp_path: Path) -> None:
    whole = gzip.compress(_jsonl(ROWS * 2000))
    (tmp_path / "train.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    message = _refusal(_read, tmp_path / "train.jsonl.gz")
    assert (
        message.startswith("dataset file train.jsonl.gz is damaged after train.jsonl.gz line ")
        and "gzip -t FILE" in message
    )


def test_text_files_hold_documents_separated_by_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes(
        b"\xef\xbb\xbfFirst document,\nstill the first.\n\n\nSecond one.\r\n\r\nThird\n"
    )
    got = list(records.iter_records(tmp_path / "corpus.txt", 1 << 20))
    assert [r for _, r in got] == [
        {"text": "First document,\nstill the first."},
        {"text": "Second one."},
        {"text": "Third"},
    ]
    assert [w.line for w, _ in got] == [1, 5, 7]
    mapping = formats.resolve(got[0][1], got[0][0], "auto", FieldMapping())
    assert mapping.format == "text"


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.csv").write_bytes(bom + _csv(ROWS))
    (tmp_path / "b.jsonl").write_bytes(bom + _jsonl(ROWS))
    (tmp_path / "c.json").write_bytes(bom + json.dumps(ROWS).encode())
    for name in ("a.csv", "b.jsonl", "c.json"):
        assert _read(tmp_path / name) == ROWS, name


def test_json_arrays_are_read_element_by_element(tmp_path: Path) -> None:
    big = [{"text": "x" * 100_000}] * 60  # 6 MB in all, 100 kB per element
    (tmp_path / "big.json").write_text(json.dumps(big))
    tracemalloc.start()
    try:
        count = sum(1 for _ in records.iter_records(tmp_path / "big.json", 200_000))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert count == 60 and peak < 1 << 20  # an element or two and ijson's buffer, not the array
    message = _refusal(_read, tmp_path / "big.json", 50_000)
    assert message.startswith(
        "big.json record 0 (a JSON array element) is larger than spec.dataset.maxRecordBytes (50000 bytes)"
    )


@pytest.mark.parametrize(
    "name, raw, place",
    [("train.jsonl", _jsonl(ROWS) + b'{"prompt": "a\\ud800b", "completion": "x"}\n', "train.jsonl line 3 (record 2): holds a lone UTF-16 surrogate (U+D800"),
     ("train.jsonl", _jsonl(ROWS) + b'{"prompt": "a\xed\xa0\x80b", "completion": "x"}\n', "train.jsonl line 3 (record 2): holds a lone UTF-16 surrogate (U+D800"),
     ("train.json", b'[{"prompt": "ok", "completion": "1"}, {"prompt": "\\udfff", "completion": "2"}]', "train.json record 1: not valid UTF-8 text (bytes that are not UTF-8, or a lone UTF-16 surrogate such as \\ud800)"),
     ("train.csv", b"prompt,completion\none,1\n\"t\xed\xa0\x80o\",2\n", "train.csv line 3 (record 1) is not UTF-8 text; save the file as UTF-8")],
    ids=["escaped", "cesu8", "json-array", "csv-cesu8"],
)  # fmt: skip
def test_a_lone_surrogate_is_a_data_error_with_file_line_and_record(
    tmp_path: Path, tokenizer: Any, name: str, raw: bytes, place: str
) -> None:
    (tmp_path / name).write_bytes(raw)
    spec = DatasetSpec.model_validate({"train": str(tmp_path / name)})
    assert place in _refusal(data.build, spec, StorageSpec(), tokenizer, 1)


def test_a_save_to_disk_directory_with_a_bad_state_json_is_a_data_error(tmp_path: Path) -> None:
    from test_data import save_to_disk_layout

    saved = save_to_disk_layout(tmp_path / "saved", ROWS)
    (saved / "state.json").write_text('{"_data_files": [{"filename": ')
    assert _refusal(_read, saved).startswith(
        f"{saved / 'state.json'} is not a valid `datasets` state.json (JSONDecodeError"
    )
    (saved / "state.json").write_text('{"_data_files": [{"filename": "../../etc/passwd"}]}')
    assert "names passwd, which is not a file in" in _refusal(_read, saved)


def test_a_multi_line_csv_record_is_placed_at_its_first_line(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "t.csv").write_text('prompt,completion\n"one\ntwo\nthree",123\n\n"four",\n')
    placed = list(records.iter_records(tmp_path / "t.csv", 1 << 20))
    assert [w.line for w, _ in placed] == [2, 6]
    spec = DatasetSpec.model_validate({"train": str(tmp_path / "t.csv")})
    message = _refusal(data.build, spec, StorageSpec(), tokenizer, 1)
    assert "t.csv line 6 (record 1): column 'completion' (completion) is empty" in message


def test_eval_on_a_dataset_dict_root_needs_a_split(
    tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_data import save_to_disk_layout

    root = tmp_path / "dd"
    save_to_disk_layout(root / "train", ROWS * 4)
    save_to_disk_layout(root / "validation", ROWS)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    spec = DatasetSpec.model_validate({"train": str(root), "eval": str(root)})
    message = _refusal(data.build, spec, StorageSpec(), tokenizer, 1)
    assert message == (f"spec.dataset.eval: {root} is a DatasetDict with splits ['train', 'validation']; without a split it would evaluate on "
                       f"`train`, the training data: name the split, eval: {root}#validation")  # fmt: skip
    built = data.build(spec.model_copy(update={"eval": f"{root}#validation"}), StorageSpec(), tokenizer, 1)
    assert len(built.train) == 8 and len(built.evals) == 2
    data.build(spec.model_copy(update={"eval": f"{root}#train"}), StorageSpec(), tokenizer, 1)
    assert "WARNING: spec.dataset.eval names the `train` split" in capsys.readouterr().out
    assert "not 'test'" in _refusal(
        data.build, spec.model_copy(update={"eval": f"{root}#test"}), StorageSpec(), tokenizer, 1
    )


# ---------------------------------------------------------------- columns


def test_spreadsheet_headers_match_ignoring_case_and_separators(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "sheet.csv").write_text("Instruction,Input,Output\nspell,one two,1 2\nspell,three,3\n")
    built = data.build(
        DatasetSpec.model_validate({"train": str(tmp_path / "sheet.csv")}), StorageSpec(), tokenizer, 1
    )
    assert built.sources[0].mapping == "instruction (instruction=Instruction, response=Output, input=Input)"
    record = {"Chosen-Response": "a", "REJECTED": "b", "prompt": "q"}
    assert (
        formats.resolve(record, HERE, "auto", FieldMapping(chosen="chosen_response"), "dpo").columns["chosen"]
        == "Chosen-Response"
    )


def test_an_ambiguous_column_is_refused_with_both_candidates() -> None:
    message = _refusal(
        formats.resolve, {"instruction": "a", "Output": "b", "out_put": "c"}, HERE, "auto", FieldMapping()
    )
    assert message == ("train.jsonl line 1 (record 0): columns ['Output', 'out_put'] could each be response ('output' or 'response' or "
                       "'answer'); set spec.dataset.fields.response to the one to use")  # fmt: skip


# ---------------------------------------------------------------- chat: weights and tools


def _learned_spans(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    spans, current = [], []
    for i, label in zip(ids + [-1], labels + [masking.IGNORE], strict=True):
        if label != masking.IGNORE:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans


def _chat(record: dict[str, Any], tok: Any) -> tuple[list[int], list[int]]:
    mapping = formats.resolve(record, HERE, "auto", FieldMapping())
    return masking.tokenize(formats.parse(record, HERE, mapping), tok, HERE)


def test_weight_zero_turns_are_context_not_learned() -> None:
    tok = qwen25()
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad answer", "weight": 0},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "good answer", "weight": 1}]}  # fmt: skip
    ids, labels = _chat(record, tok)
    assert _learned_spans(tok, ids, labels) == ["good answer<|im_end|>"]
    assert "bad answer" in tok.decode(ids)
    record["messages"][3]["weight"] = 0
    with pytest.raises(
        formats.Invalid, match=r"no assistant message to learn from \(every one has weight 0\)"
    ):
        _chat(record, tok)
    record["messages"][3]["weight"] = 0.5
    assert (
        _refusal(_chat, record, tok)
        == "train.jsonl line 1 (record 0): message 3 has weight 0.5; weight is 0 (not learned) or 1 (learned)"
    )


TOOL_CHAT = {
    "messages": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ],
    "tools": TOOLS,
}
TOOLS_JSON = json.dumps(TOOLS[0])
# The rendered conversation in pieces, each (text, learned): ids and labels are the pieces' ids one after the other.
EXPECTED = {
    "qwen2.5": [
        (f"<|im_start|>system\nYou help.\n\n# Tools\n\n<tools>\n{TOOLS_JSON}\n</tools><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("Sunny.<|im_end|>", True),
        ("\n", False),
    ],
    "llama3.1": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nYou help.<|eot_id|><|start_header_id|>user<|end_header_id|>"
         f"\n\nGiven the following functions, respond with a JSON for a function call.\n\n{TOOLS_JSON}\n\nWeather in Paris?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', True),
        ('<|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n', False),
        ("Sunny.<|eot_id|>", True),
    ],
}  # fmt: skip


@pytest.mark.parametrize("style", ["qwen2.5", "llama3.1"])
def test_tool_calls_are_rendered_and_learned_and_tool_results_never(style: str) -> None:
    tok = qwen25() if style == "qwen2.5" else llama31()
    ids, labels = _chat(TOOL_CHAT, tok)
    want_ids: list[int] = []
    want_labels: list[int] = []
    for text, learned in EXPECTED[style]:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += piece
        want_labels += piece if learned else [masking.IGNORE] * len(piece)
    assert ids == want_ids
    assert (
        labels == want_labels
    )  # token by token: the call and the answer through EOS, nothing of the tool's result


def test_a_template_that_cannot_render_tools_is_refused_by_name(tokenizer: Any) -> None:
    message = _refusal(_chat, TOOL_CHAT, tokenizer)
    assert message.startswith(
        f"train.jsonl line 1 (record 0): the chat template of {TINY_MODEL} does not render `tools`"
    )
    no_tools = {"messages": TOOL_CHAT["messages"]}
    assert (
        f"the chat template of {TINY_MODEL} does not render tool_calls (message 2 calls 'get_weather'"
        in _refusal(_chat, no_tools, tokenizer)
    )


# ---------------------------------------------------------------- preference pairs

USER = {"role": "user", "content": "one two"}
SYSTEM = {"role": "system", "content": "Spell digits."}
# Each shape as published, and (prompt, chosen, rejected) as kubetune reads it.
SHAPES: dict[str, dict[str, Any]] = {
    "explicit-text": {"prompt": "one two", "chosen": " 1 2", "rejected": " 2 1"},
    "hh-rlhf": {"chosen": "\n\nHuman: one two\n\nAssistant: 1 2", "rejected": "\n\nHuman: one two\n\nAssistant: two one"},
    "trl-conversational": {"prompt": [USER], "chosen": [{"role": "assistant", "content": "1 2"}], "rejected": [{"role": "assistant", "content": "2 1"}]},
    "trl-implicit": {"chosen": [USER, {"role": "assistant", "content": "1 2"}], "rejected": [USER, {"role": "assistant", "content": "2 1"}]},
    "shared-system": {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "1 2"}], "rejected": [SYSTEM, USER, {"role": "assistant", "content": "2 1"}]},
    "ultrafeedback-binarized": {"prompt": "one two", "prompt_id": "abc", "chosen": [USER, {"role": "assistant", "content": "1 2"}],
                                "rejected": [USER, {"role": "assistant", "content": "2 1"}], "messages": [USER, {"role": "assistant", "content": "1 2"}],
                                "score_chosen": 8.0, "score_rejected": 3.0},
}  # fmt: skip


def _pair(record: dict[str, Any]) -> formats.Sample:
    return formats.parse(record, HERE, formats.resolve(record, HERE, "auto", FieldMapping(), "dpo"))


def test_each_preference_shape_reads_as_prompt_and_two_replies() -> None:
    text = _pair(SHAPES["explicit-text"])
    assert (text.prompt, text.response, text.rejected) == ("one two", " 1 2", " 2 1")
    hh = _pair(SHAPES["hh-rlhf"])  # the common beginning is the prompt; the replies keep their leading space
    assert (hh.prompt, hh.response, hh.rejected) == ("\n\nHuman: one two\n\nAssistant:", " 1 2", " two one")
    for name in ("trl-conversational", "trl-implicit", "ultrafeedback-binarized"):
        pair = _pair(SHAPES[name])
        assert [t.message() for t in pair.messages] == [USER], name
        assert [t.content for t in pair.chosen_turns] == ["1 2"] and [
            t.content for t in pair.rejected_turns
        ] == ["2 1"], name
    system = _pair(SHAPES["shared-system"])
    assert [t.role for t in system.messages] == ["system", "user"]


def test_objective_dpo_detects_preference_where_sft_sees_a_chat() -> None:
    record = SHAPES["ultrafeedback-binarized"]
    assert (
        formats.resolve(record, HERE, "auto", FieldMapping()).format == "chat"
    )  # SFT: the `messages` column
    assert formats.resolve(record, HERE, "auto", FieldMapping(), "dpo").format == "preference"


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _source_pairs(path: Path, tokenizer: Any, **spec: Any) -> tuple[list[dpo.PairExample], data.SourceReport]:
    ds = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 64, **spec})
    return dpo.source_pairs(path, path.name, ds.format, ds.fields, ds, tokenizer)


def test_preference_refusals_carry_reason_file_line_and_record(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        SHAPES["explicit-text"],
        {"prompt": "x", "chosen": " same", "rejected": " same"},
        {"chosen": "abc", "rejected": "xyz"},
    ]
    message = _refusal(_source_pairs, _write(tmp_path / "p.jsonl", rows), tokenizer)
    assert message.startswith(
        "2 of 3 records in p.jsonl are invalid (1 chosen equals rejected, 1 no shared prompt)"
    )
    assert (
        "first: p.jsonl line 2 (record 1): chosen and rejected are the same text; p.jsonl line 3 (record 2): chosen and rejected share no "
        in message
    )
    message = _refusal(
        _source_pairs, _write(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}]), tokenizer
    )
    assert message.startswith(
        "i.jsonl line 1 (record 0): objective dpo needs preference pairs: 'chosen' and 'rejected' (strings or message lists)"
    )
    long = {"prompt": "one " * 40, "chosen": " 1", "rejected": " 2"}
    message = _refusal(
        _source_pairs,
        _write(tmp_path / "l.jsonl", [SHAPES["explicit-text"], long]),
        tokenizer,
        overflow="error",
        maxSeqLength=32,
    )
    assert message.startswith(
        "l.jsonl line 2 (record 1): the pair is 42 tokens (prompt + longer reply), more than spec.dataset.maxSeqLength 32"
    )
    message = _refusal(
        _source_pairs, _write(tmp_path / "l.jsonl", [long]), tokenizer, overflow="truncate", maxSeqLength=32
    )
    assert message.startswith(
        "no preference pair in l.jsonl keeps a reply within spec.dataset.maxSeqLength 32: 1 of 1 pairs lost every reply token"
    )


TRL_SHAPES = ["explicit-text", "hh-rlhf", "trl-conversational", "trl-implicit", "shared-system"]


@pytest.mark.parametrize("name", TRL_SHAPES)
@pytest.mark.parametrize("template", ["tiny-llama", "qwen2.5", "llama3.1"])
def test_preference_token_ids_match_trl(tmp_path: Path, tokenizer: Any, name: str, template: str) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    tok = {"tiny-llama": tokenizer, "qwen2.5": qwen25(), "llama3.1": llama31()}[template]
    record = SHAPES[name]
    args = trl.DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None, dataset_num_proc=None
    )
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)), args=args,
                             train_dataset=datasets.Dataset.from_list([SHAPES["explicit-text"]]), processing_class=tokenizer)  # fmt: skip
    trainer._tokenizer = tok  # the EOS TRL appends to text replies
    (theirs,) = trainer._prepare_dataset(datasets.Dataset.from_list([record] * 1), tok, args, "train")
    ours = masking.preference_ids(_pair(record), tok, HERE)
    assert ours == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    assert ours[0] and ours[1] and ours[2]


def test_preflight_follows_objective_dpo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli.main import main

    rows = [SHAPES["trl-conversational"]] * 7 + [{"prompt": [USER], "chosen": [{"role": "assistant", "content": "1 2 " * 20}],
                                                  "rejected": [{"role": "assistant", "content": "2 1"}]}]  # fmt: skip
    _write(tmp_path / "train.jsonl", rows)
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pf"},
           "spec": {"model": {"source": str(TINY_MODEL)}, "objective": "dpo", "dataset": {"train": "train.jsonl", "maxSeqLength": 24},
                    "training": {"perDeviceBatchSize": 2}, "distributed": {"procsPerNode": 1}, "output": {"uri": "/tmp/unused"}}}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["preflight", str(tmp_path / "job.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["objective"] == "dpo"
        and summary["sources"][0]["format"] == "preference"
        and summary["trainSequences"] == 8
    )
    pair = summary["pairs"][0]
    assert pair["prompt"] == "<|user|> one two <|end|> <|assistant|>"
    assert "".join(t["text"] for t in pair["chosen"] if t["learned"]) == " 1 2 <|end|>"
    assert "".join(t["text"] for t in pair["rejected"] if t["learned"]) == " 2 1 <|end|>"
    assert (pair["promptTokens"], pair["chosenTokens"], pair["rejectedTokens"]) == (5, 3, 3)
    assert summary["lengths"]["overMaxSeqLength"] == 1 and summary["overflow"]["truncated"] == 1
    assert main(["preflight", str(tmp_path / "job.yaml")]) == 0
    out = capsys.readouterr().out
    assert (
        "pair 1 (5 prompt tokens, chosen 3, rejected 3):" in out
        and "scored reply tokens between [[ ]]; the prompt is context" in out
    )
    assert (
        "  chosen:   [[ 1 2 <|end|>]]" in out and "  rejected: [[ 2 1 <|end|>]]" in out
    )  # not a terminal: marked, not coloured


def test_preflight_refuses_a_bad_record_as_data_not_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune.cli.main import main

    (tmp_path / "train.jsonl").write_bytes(
        _jsonl([{"messages": [USER, {"role": "assistant", "content": "1 2"}]}] * 3) + b'{"text": "\\ud800"}\n'
    )
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pf"},
           "spec": {"model": {"source": str(TINY_MODEL)}, "dataset": {"train": "train.jsonl"}, "output": {"uri": "/tmp/unused"}}}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["preflight", str(tmp_path / "job.yaml")]) == 66
    err = capsys.readouterr().err
    assert (
        err.startswith("DatasetInvalid: train.jsonl line 4 (record 3): holds a lone UTF-16 surrogate")
        and "bug" not in err
    )


def test_preference_pairs_with_tools_match_trl(tmp_path: Path, tokenizer: Any) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    tok = qwen25()
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = {"prompt": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
              "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
              "rejected": [{"role": "assistant", "content": "I cannot know.", "tool_calls": []}]}  # fmt: skip
    args = trl.DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None, dataset_num_proc=None
    )
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)), args=args,
                             train_dataset=datasets.Dataset.from_list([SHAPES["explicit-text"]]), processing_class=tokenizer)  # fmt: skip
    (theirs,) = trainer._prepare_dataset(datasets.Dataset.from_list([record]), tok, args, "train")
    prompt, chosen, rejected = masking.preference_ids(_pair(record), tok, HERE)
    assert (prompt, chosen, rejected) == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    assert "# Tools" in tok.decode(prompt) and '<tool_call>\n{"name": "get_weather"' in tok.decode(chosen)
