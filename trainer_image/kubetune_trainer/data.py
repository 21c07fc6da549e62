"""Records -> token ids with loss masks -> (optionally packed) training examples.

Formats: chat (`messages`, rendered with the tokenizer's chat template), instruction
(instruction [+ input] -> response), prompt_completion, text. Loss is computed only
on response tokens (label -100 elsewhere). Packing concatenates examples into
sequences of maxSeqLength with position_ids restarting at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask from the
position_ids (masking_utils.find_packed_sequence_indices), so attention never crosses
an example boundary with the eager and SDPA kernels used on CPU, and with
flash-attention on GPU. This holds only without a KV cache (the trainer passes
use_cache=False; with a cache transformers skips the packed-sequence mask). The first token of every packed example gets no label, so
no example is ever trained to predict from its neighbour.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, StorageSpec

from kubetune_trainer.errors import TrainerError
from kubetune_trainer.storage import cached, fetch

IGNORE = -100
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


# ------------------------------------------------------------------- reading


def read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    try:
        if name.endswith(".jsonl") or name.endswith(".json"):
            text = path.read_text()
            if name.endswith(".json") and text.lstrip().startswith("["):
                return list(json.loads(text))
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if name.endswith(".csv"):
            with open(path, newline="") as handle:
                return list(csv.DictReader(handle))
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except TrainerError:
        raise
    except Exception as exc:
        raise TrainerError(ExitCode.DATASET_INVALID, f"dataset file {path.name} cannot be read: {type(exc).__name__}: {exc}") from exc
    raise TrainerError(ExitCode.DATASET_INVALID, f"dataset file {path.name}: unsupported type; use .jsonl, .parquet or .csv")


def read_records(path: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise TrainerError(ExitCode.DATASET_INVALID, f"no .jsonl/.parquet/.csv files under {path}")
    records = [r for f in files for r in read_file(f)]
    if not records:
        raise TrainerError(ExitCode.DATASET_INVALID, f"dataset {path} has no records")
    return records


# ------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any], spec: DatasetSpec) -> str:
    fields = spec.fields
    if fields.messages in record:
        return "chat"
    if fields.instruction in record and fields.response in record:
        return "instruction"
    if fields.prompt in record and fields.completion in record:
        return "prompt_completion"
    if fields.text in record:
        return "text"
    raise TrainerError(
        ExitCode.DATASET_INVALID,
        f"cannot detect the dataset format from columns {sorted(record)}; expected one of "
        f"'{fields.messages}', '{fields.instruction}'+'{fields.response}', '{fields.prompt}'+'{fields.completion}', "
        f"'{fields.text}' (see spec.dataset.fields)",
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Tokens of the rendered conversation; labels only on assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError(ExitCode.DATASET_INVALID, "format chat needs a tokenizer with a chat template")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    ids = _ids(tokenizer, render(messages, False))
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_ids(tokenizer, render(messages[:i], True)))
        end = len(_ids(tokenizer, render(messages[: i + 1], False)))
        labels[start:end] = ids[start:end]
    return ids, labels


def _prompt_response_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    prompt_ids = _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def tokenize_record(record: dict[str, Any], fmt: str, spec: DatasetSpec, tokenizer: Any) -> tuple[list[int], list[int]]:
    f = spec.fields
    try:
        if fmt == "chat":
            messages = record[f.messages]
            if isinstance(messages, str):
                messages = json.loads(messages)
            return _chat_ids(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
        if fmt == "instruction":
            instruction = str(record[f.instruction])
            extra = record.get(f.input)
            user = f"{instruction}\n\n{extra}" if extra else instruction
            if getattr(tokenizer, "chat_template", None):
                return _chat_ids(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": str(record[f.response])}])
            return _prompt_response_ids(tokenizer, f"### Instruction:\n{user}\n\n### Response:\n", str(record[f.response]))
        if fmt == "prompt_completion":
            return _prompt_response_ids(tokenizer, str(record[f.prompt]), str(record[f.completion]))
        if fmt == "text":
            ids = _ids(tokenizer, str(record[f.text]))
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            return ids, list(ids)
    except TrainerError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainerError(ExitCode.DATASET_INVALID, f"record does not fit format {fmt}: {type(exc).__name__}: {exc}") from exc
    raise TrainerError(ExitCode.CONFIG_INVALID, f"unknown dataset format {fmt}")


# ------------------------------------------------------------------- examples


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def tokenize_all(records: list[dict[str, Any]], spec: DatasetSpec, tokenizer: Any) -> list[Example]:
    fmt = spec.format if spec.format != "auto" else detect_format(records[0], spec)
    examples = []
    for record in records:
        ids, labels = tokenize_record(record, fmt, spec, tokenizer)
        ids, labels = ids[: spec.max_seq_length], labels[: spec.max_seq_length]
        if any(label != IGNORE for label in labels[1:]):
            examples.append(Example(ids, labels, list(range(len(ids)))))
    if not examples:
        raise TrainerError(ExitCode.DATASET_INVALID, f"no example has tokens to learn from (format {fmt}, maxSeqLength {spec.max_seq_length})")
    return examples


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy packing in order; position_ids restart per example and each example's first token is unlabeled."""
    packed: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_len:
            packed.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += [IGNORE] + ex.labels[1:]
        current.position_ids += list(range(len(ex.input_ids)))
    if current.input_ids:
        packed.append(current)
    return packed


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def collate(batch: list[Example], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right padding. Packed batches carry position_ids and no attention mask (block-diagonal from positions)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        positions[row, :n] = torch.tensor(e.position_ids)
        positions[row, n:] = torch.arange(width - n)  # padding forms its own block, never attended by real tokens
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------- loading


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def generation_pairs(examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) for examples whose loss starts after a prompt: the first labeled span."""
    pairs = []
    for e in examples:
        labeled = [i for i, label in enumerate(e.labels) if label != IGNORE]
        if not labeled or labeled[0] == 0:
            continue
        start = end = labeled[0]
        while end < len(e.labels) and e.labels[end] != IGNORE:
            end += 1
        pairs.append((e.input_ids[:start], e.input_ids[start:end]))
    return pairs


def load_examples(
    spec: DatasetSpec, storage: StorageSpec, tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], list[tuple[list[int], list[int]]]]:
    """Train and eval examples and eval (prompt, reference) pairs, tokenized once per node (first process under the cache lock; others load)."""
    train_path = fetch(spec.train, storage, "spec.dataset.train", ExitCode.DATASET_INVALID)
    eval_path = fetch(spec.eval, storage, "spec.dataset.eval", ExitCode.DATASET_INVALID) if spec.eval else None
    key = json.dumps(
        {
            "train": _fingerprint(train_path),
            "eval": _fingerprint(eval_path) if eval_path else None,
            "spec": spec.model_dump(mode="json"),
            "tokenizer": [tokenizer.name_or_path, len(tokenizer), getattr(tokenizer, "chat_template", None)],
            "seed": seed,
        },
        sort_keys=True,
    )

    def build(directory: Path) -> None:
        train = tokenize_all(read_records(train_path), spec, tokenizer)
        if eval_path is not None:
            evals = tokenize_all(read_records(eval_path), spec, tokenizer)
        else:
            train, evals = split_eval(train, spec.eval_split, seed)
        pairs = generation_pairs(evals)
        if spec.packing:
            train, evals = pack(train, spec.max_seq_length), pack(evals, spec.max_seq_length)
        torch.save({"train": [vars(e) for e in train], "eval": [vars(e) for e in evals], "pairs": pairs}, directory / "examples.pt")

    directory = cached("tokenized:" + key, build)
    data = torch.load(directory / "examples.pt")
    return [Example(**e) for e in data["train"]], [Example(**e) for e in data["eval"]], [tuple(p) for p in data["pairs"]]
