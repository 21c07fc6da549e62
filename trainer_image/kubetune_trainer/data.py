"""Datasets -> token ids with loss masks -> (optionally packed) training examples.

Reading files is records.py, formats and column mappings formats.py, ids and loss masks
masking.py; this module builds the examples (overflow policy, invalid records, mixing
weights, eval split), caches them per node, and batches them.

Packing concatenates examples into sequences of maxSeqLength with position_ids restarting
at 0 for each example and no attention mask: transformers then builds a block-diagonal
causal mask from the position_ids (masking_utils.find_packed_sequence_indices), so attention
never crosses an example boundary with the eager and SDPA kernels. This holds only without a
KV cache (the trainer passes use_cache=False; with a cache transformers skips the
packed-sequence mask). It does NOT hold for transformers' flash-attention path when a batch
has several rows (it reads boundaries from position_ids only for one row): the trainer
normally flattens each micro-batch into one row instead (batching.py, attention.py), and
`collate` here serves only models that keep their own attention. The first token of every
packed example gets no label, so no example is ever trained to predict from its neighbour.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kubetune.api.contract import ExitCode
from kubetune.api.models import DatasetSpec, FieldMapping, StorageSpec, TrainingSpec

from kubetune_trainer.formats import Invalid, Mapping, parse, resolve
from kubetune_trainer.log import log
from kubetune_trainer.masking import IGNORE, tokenize, upto_eos
from kubetune_trainer.records import dict_splits, iter_records, locate, refuse, split_fragment, with_split
from kubetune_trainer.storage import cached, fetch, local_identity

__all__ = ["IGNORE", "upto_eos"]

# ------------------------------------------------------------------- examples


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


@dataclass
class SourceReport:
    """What one dataset gave: records read, examples kept, and why the others were not."""

    path: str
    format: str = ""
    mapping: str = ""
    weight: float = 1.0
    records: int = 0
    examples: int = 0
    tokens: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    invalid_detail: list[str] = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per example before overflow handling

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "mapping": self.mapping, "weight": self.weight,
            "records": self.records, "examples": self.examples, "tokens": self.tokens, "invalid": dict(self.invalid),
            "truncated": self.truncated, "truncatedTokens": self.truncated_tokens, "dropped": self.dropped, "droppedTokens": self.dropped_tokens,
        }  # fmt: skip


def tokenize_source(
    path: Path, label: str, fmt: str, fields: FieldMapping, spec: DatasetSpec, tokenizer: Any
) -> tuple[list[Example], SourceReport]:
    """Every record of one dataset, streamed: parsed, tokenized, overflow applied. Refuses what cannot train."""
    report = SourceReport(label)
    examples: list[Example] = []
    for where, sample in valid_samples(path, fmt, fields, spec, report):
        fitted = _fit(*tokenize(sample, tokenizer, where), spec, where, report)
        if fitted is not None:
            examples.append(Example(fitted[0], fitted[1], list(range(len(fitted[0])))))
            report.tokens += len(fitted[0])
    report.examples = len(examples)
    _check_source(report, examples, label, spec)
    return examples, report


def valid_samples(
    path: Path,
    fmt: str,
    fields: FieldMapping,
    spec: DatasetSpec,
    report: SourceReport,
    objective: str = "sft",
) -> Iterator[tuple[object, Any]]:
    """(place, parsed sample) for every valid record of one source, streamed; the format is resolved from the
    first record. Counts records and invalid ones (reason, first three places) in `report`; refuses a source
    with no records at all."""
    mapping: Mapping | None = None
    for where, record in iter_records(path, spec.max_record_bytes):
        if mapping is None:
            mapping = resolve(record, where, fmt, fields, objective=objective)
            report.format, report.mapping = mapping.format, mapping.describe()
        report.records += 1
        try:
            sample = parse(record, where, mapping)
        except Invalid as bad:
            report.invalid[bad.reason] += 1
            if len(report.invalid_detail) < 3:
                report.invalid_detail.append(bad.detail)
            continue
        yield where, sample
    if mapping is None:
        raise refuse(f"dataset {report.path} has no records")


def _fit(
    ids: list[int], labels: list[int], spec: DatasetSpec, where: object, report: SourceReport
) -> tuple[list[int], list[int]] | None:
    """spec.dataset.overflow applied to one tokenized record (counted in `report`); None when it is dropped."""
    limit = spec.max_seq_length
    report.lengths.append(len(ids))
    if len(ids) > limit:
        if spec.overflow == "error":
            raise refuse(
                f"{where}: {len(ids)} tokens, more than spec.dataset.maxSeqLength {limit}; raise maxSeqLength, "
                "or set spec.dataset.overflow: truncate (or drop)"
            )
        if spec.overflow == "drop":
            report.dropped += 1
            report.dropped_tokens += len(ids)
            return None
        report.truncated += 1
        report.truncated_tokens += len(ids) - limit
        ids, labels = ids[:limit], labels[:limit]
    if not any(label != IGNORE for label in labels[1:]):  # truncation cut every learned token
        report.dropped += 1
        report.dropped_tokens += len(ids)
        return None
    return ids, labels


def _check_source(report: SourceReport, examples: list[Example], label: str, spec: DatasetSpec) -> None:
    """Refuse a source with too many invalid records or nothing to learn from."""
    limit = spec.max_seq_length
    bad = sum(report.invalid.values())
    if bad > spec.max_invalid_fraction * report.records:
        reasons = ", ".join(f"{n} {r}" for r, n in report.invalid.most_common())
        share = bad / report.records
        raise refuse(
            f"{bad} of {report.records} records in {label} are invalid ({reasons}), more than spec.dataset.maxInvalidFraction "
            f"{spec.max_invalid_fraction:g}; first: {'; '.join(report.invalid_detail)}. Fix the data, or skip them with "
            f"spec.dataset.maxInvalidFraction: {math.ceil(share * 1000) / 1000:g}"
        )
    if not examples:
        raise refuse(
            f"no example in {label} has tokens to learn from (format {report.format}, maxSeqLength {limit}, overflow {spec.overflow}"
            f", {report.dropped} dropped); raise spec.dataset.maxSeqLength"
        )


def weighted(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """`weight` x the examples: whole repeats, then a seeded sample for the fraction."""
    whole = int(weight)
    extra = round((weight - whole) * len(examples))
    if whole == 0:
        extra = max(extra, 1)
    return examples * whole + random.Random(seed).sample(examples, min(extra, len(examples)))


def check_batch(n_train: int, training: TrainingSpec, world_size: int, accum: int) -> None:
    """Too little data for one optimizer step is a dataset error, not a step that never comes."""
    need = training.per_device_batch_size * world_size * accum
    if n_train < need:
        raise refuse(
            f"{n_train} training sequences, fewer than one optimizer step needs ({need} = perDeviceBatchSize "
            f"{training.per_device_batch_size} x {world_size} processes x {accum} accumulation); add data or lower "
            "spec.training.globalBatchSize / perDeviceBatchSize"
        )


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
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


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
        positions[row, n:] = torch.arange(
            width - n
        )  # padding forms its own block, never attended by real tokens
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------- loading


def _fingerprint(path: Path) -> str:
    """The tokenized cache's key for a fetched source: where it is (a #split included) and what it holds
    (storage.local_identity: size, mtime_ns, ctime_ns, inode and a sampled sha256 of each file)."""
    located, _ = locate(path)
    return f"{path}:{local_identity(located)}"


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


@dataclass
class Built:
    train: list[Example]
    evals: list[Example]
    pairs: list[tuple[list[int], list[int]]]
    sources: list[SourceReport]
    eval_source: SourceReport | None
    starts: list[int] = field(
        default_factory=list
    )  # where each source's examples begin in `train` (unpacked)

    def report(self) -> dict[str, Any]:
        """Data counts for the log and metrics.json."""
        parts = self.sources + ([self.eval_source] if self.eval_source else [])
        examples = sum(p.examples + p.dropped for p in parts)
        truncated, dropped = sum(p.truncated for p in parts), sum(p.dropped for p in parts)
        return {
            "sources": [p.summary() for p in self.sources],
            "eval": self.eval_source.summary() if self.eval_source else None,
            "trainSequences": len(self.train),
            "evalSequences": len(self.evals),
            "trainTokens": sum(len(e.input_ids) for e in self.train),
            "truncated": truncated,
            "truncatedTokens": sum(p.truncated_tokens for p in parts),
            "dropped": dropped,
            "droppedTokens": sum(p.dropped_tokens for p in parts),
            "overflowShare": (truncated + dropped) / max(examples, 1),
            "longest": max((n for p in self.sources for n in p.lengths), default=0),
            "invalid": sum(sum(p.invalid.values()) for p in parts),
        }


def fetch_data(uri: str, storage: StorageSpec, what: str) -> Path:
    """The local path of a dataset URI; a `#split` fragment (a DatasetDict's split) is kept for the reader."""
    base, split = split_fragment(uri)
    return with_split(fetch(base, storage, what, ExitCode.DATASET_INVALID, repo_type="dataset"), split)


def eval_path(spec: DatasetSpec, storage: StorageSpec) -> Path:
    """spec.dataset.eval, local. A DatasetDict root needs its split named (it would evaluate on `train`, the
    training data); naming `train` is allowed, with a warning."""
    assert spec.eval
    path = fetch_data(spec.eval, storage, "spec.dataset.eval")
    root, split = locate(path)
    splits = dict_splits(root) if root.is_dir() else None
    if splits is not None and split is None:
        held = [s for s in splits if s != "train"]
        raise refuse(
            f"spec.dataset.eval: {spec.eval} is a DatasetDict with splits {splits}; without a split it would evaluate on `train`, "
            f"the training data: name the split, eval: {spec.eval}#{held[0] if held else '<split>'}"
        )
    if split == "train":
        log(
            f"WARNING: spec.dataset.eval names the `train` split of {spec.eval}: evaluation measures data the model may train on, not held-out data"
        )
    return path


def _sources(spec: DatasetSpec, storage: StorageSpec) -> list[tuple[Path, str, str, FieldMapping, float]]:
    out: list[tuple[Path, str, str, FieldMapping, float]] = []
    for i, source in enumerate(spec.train_sources()):
        what = f"spec.dataset.sources[{i}].path" if spec.sources else "spec.dataset.train"
        path = fetch_data(source.path, storage, what)
        out.append(
            (path, source.path, source.format or spec.format, source.fields or spec.fields, source.weight)
        )
    return out


def build(spec: DatasetSpec, storage: StorageSpec, tokenizer: Any, seed: int) -> Built:
    """Train and eval examples, eval (prompt, reference) pairs and what each dataset gave."""
    train: list[Example] = []
    evals: list[Example] = []
    reports, starts = [], []
    for path, label, fmt, fields, weight in _sources(spec, storage):
        starts.append(len(train))
        examples, report = tokenize_source(path, label, fmt, fields, spec, tokenizer)
        report.weight = weight
        reports.append(report)
        if not spec.eval:
            examples, held = split_eval(examples, spec.eval_split, seed)
            evals += held
        train += weighted(examples, weight, seed) if weight != 1 else examples
    eval_report = None
    if spec.eval:
        evals, eval_report = tokenize_source(
            eval_path(spec, storage), spec.eval, spec.format, spec.fields, spec, tokenizer
        )
    pairs = generation_pairs(evals)
    if spec.packing:
        train, evals = pack(train, spec.max_seq_length), pack(evals, spec.max_seq_length)
    return Built(train, evals, pairs, reports, eval_report, [] if spec.packing else starts)


def load_examples(
    spec: DatasetSpec, storage: StorageSpec, tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], list[tuple[list[int], list[int]]], dict[str, Any]]:
    """Train and eval examples, eval (prompt, reference) pairs and the data report, built once per node
    (first process under the cache lock; others load)."""
    paths = [p for p, *_ in _sources(spec, storage)]
    eval_file = eval_path(spec, storage) if spec.eval else None
    key = json.dumps(
        {
            "train": [_fingerprint(p) for p in paths],
            "eval": _fingerprint(eval_file) if eval_file else None,
            "spec": spec.model_dump(mode="json"),
            "tokenizer": [tokenizer.name_or_path, len(tokenizer), getattr(tokenizer, "chat_template", None)],
            "seed": seed,
        },
        sort_keys=True,
    )

    def fill(directory: Path) -> None:
        built = build(spec, storage, tokenizer, seed)
        torch.save({"train": [vars(e) for e in built.train], "eval": [vars(e) for e in built.evals], "pairs": built.pairs,
                    "report": built.report()}, directory / "examples.pt")  # fmt: skip

    directory = cached("tokenized:" + key, fill)
    data = torch.load(directory / "examples.pt")
    return (
        [Example(**e) for e in data["train"]],
        [Example(**e) for e in data["eval"]],
        [tuple(p) for p in data["pairs"]],
        data["report"],
    )


def report_lines(report: dict[str, Any], spec: DatasetSpec) -> list[str]:
    """The data report for the log: each source's format and counts, and overflow when any."""
    lines = []
    for s in report["sources"]:
        invalid = (
            f", {sum(s['invalid'].values())} invalid skipped ({', '.join(f'{n} {r}' for r, n in s['invalid'].items())})"
            if s["invalid"]
            else ""
        )
        lines.append(
            f"data {s['path']}: {s['mapping']}; {s['records']} records -> {s['examples']} examples{invalid}"
        )
    if report["truncated"] or report["dropped"]:
        lines.append(
            f"overflow ({spec.overflow}, maxSeqLength {spec.max_seq_length}): {report['truncated']} examples truncated "
            f"({report['truncatedTokens']} tokens cut), {report['dropped']} dropped ({report['droppedTokens']} tokens): "
            f"{report['overflowShare']:.1%} of examples"
        )
    return lines


def data_warning(report: dict[str, Any], spec: DatasetSpec) -> str | None:
    """One line for status.progress.dataWarning when more than 1% of examples overflowed, or records were skipped."""
    parts = []
    if report["overflowShare"] > 0.01:
        parts.append(
            f"{report['overflowShare']:.1%} of examples longer than maxSeqLength {spec.max_seq_length} "
            f"({report['truncated']} truncated, {report['dropped']} dropped; overflow: {spec.overflow})"
        )
    if report["invalid"]:
        parts.append(
            f"{report['invalid']} invalid records skipped (maxInvalidFraction {spec.max_invalid_fraction:g})"
        )
    return "; ".join(parts) + "; see metrics.json data" if parts else None
