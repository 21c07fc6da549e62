"""Each published dataset shape trains with `format: auto` and its loss falls: one SFT run mixes the
supervised shapes, one DPO run the preference shapes, each file written in that exact shape (compressed
where the published files are), on a tiny model built here with a Qwen2.5-style tool-calling template."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_templates import byte_model, qwen25
from kubetune.api.models import DatasetSpec, FieldMapping, StorageSpec
from kubetune_trainer import data, dpo
from test_formats_train import pairs
from trainer_helpers import job_spec, run_trainer

TOOLS = [{"type": "function", "function": {"name": "spell", "parameters": {"type": "object"}}}]


WORDS = "zero one two three four five six seven eight nine".split()


def _zst(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


def _lines(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def sft_shapes(tmp: Path) -> dict[str, Path]:
    """The supervised shapes: a spreadsheet export, OpenAI chat with tools and weights (gzip), a plain-text
    corpus (zstd), a JSON array of prompt/completion (bzip2)."""
    out = {}
    out["spreadsheet"] = tmp / "sheet.csv"
    out["spreadsheet"].write_text(
        "Instruction,Input,Output\n" + "".join(f"Spell the digits,{q},{a}\n" for q, a in pairs(32, 0))
    )
    chats = []
    for q, a in pairs(32, 48):
        call = {
            "id": "c1",
            "type": "function",
            "function": {"name": "spell", "arguments": json.dumps({"words": q})},
        }
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "let me think", "weight": 0},
                                   {"role": "user", "content": "use the tool"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                                   {"role": "tool", "tool_call_id": "c1", "content": a}, {"role": "assistant", "content": a}],
                      "tools": TOOLS})  # fmt: skip
    out["openai-tools"] = tmp / "chat.jsonl.gz"
    out["openai-tools"].write_bytes(gzip.compress(_lines(chats)))
    out["text-corpus"] = tmp / "corpus.txt.zst"
    out["text-corpus"].write_bytes(_zst("".join(f"{q} = {a}\n\n" for q, a in pairs(32, 96)).encode()))
    out["json-array"] = tmp / "pc.json.bz2"
    out["json-array"].write_bytes(
        bz2.compress(
            json.dumps([{"prompt": f"{q} =", "completion": f" {a}"} for q, a in pairs(32, 144)]).encode()
        )
    )
    return out


def dpo_shapes(tmp: Path) -> dict[str, Path]:
    """The preference shapes: HH-RLHF transcripts (gzip JSONL), TRL's conversational pairs, UltraFeedback-binarized
    rows (Parquet: prompt text, chosen/rejected repeating it, scores), implicit conversational pairs (a JSON array)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def wrong(
        a: str,
    ) -> str:  # the words echoed back instead of the digits (what a tiny model can tell apart in 30 steps)
        return " ".join(WORDS[int(d)] for d in a.split())

    out = {}
    hh = [
        {
            "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
            "rejected": f"\n\nHuman: {q}\n\nAssistant: {wrong(a)}",
        }
        for q, a in pairs(48, 0)
    ]
    out["hh-rlhf"] = tmp / "hh.jsonl.gz"
    out["hh-rlhf"].write_bytes(gzip.compress(_lines(hh)))
    conv = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": wrong(a)}]} for q, a in pairs(48, 64)]  # fmt: skip
    out["trl-conversational"] = tmp / "conv.jsonl"
    out["trl-conversational"].write_bytes(_lines(conv))
    uf = [{"prompt": q, "prompt_id": str(i), "chosen": [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}],
           "rejected": [{"content": q, "role": "user"}, {"content": wrong(a), "role": "assistant"}],
           "messages": [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}], "score_chosen": 8.0, "score_rejected": 2.0}
          for i, (q, a) in enumerate(pairs(48, 128))]  # fmt: skip
    out["ultrafeedback-binarized"] = tmp / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(uf), out["ultrafeedback-binarized"])
    system = {"role": "system", "content": "Spell digits."}
    implicit = [{"chosen": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}],
                 "rejected": [system, {"role": "user", "content": q}, {"role": "assistant", "content": wrong(a)}]} for q, a in pairs(48, 192)]  # fmt: skip
    out["trl-implicit"] = tmp / "implicit.json"
    out["trl-implicit"].write_text(json.dumps(implicit))
    return out


def _model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _spec(tmp: Path, model: Path, files: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    settings = {
        "model.source": str(model),
        "method": "full",
        "training.perDeviceBatchSize": 4,
        "output.checkpointSteps": 1000,
    }
    spec = job_spec(tmp, **{**settings, **overrides})
    spec.pop("lora")
    spec["dataset"] = {"sources": [{"path": str(p)} for p in files.values()], "maxSeqLength": 320}
    return spec


@pytest.mark.slow
def test_supervised_shapes_train_with_a_falling_loss(tmp_path: Path) -> None:
    tok = qwen25()
    model = byte_model(tmp_path / "base", tok)
    files = sft_shapes(tmp_path)
    spec = _spec(tmp_path, model, files, **{"training.maxSteps": 30, "training.learningRate": 0.006})
    code, out = run_trainer(tmp_path, spec, nproc=1, timeout=600)
    assert code == 0, out[-4000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [s["format"] for s in metrics["data"]["sources"]] == [
        "instruction",
        "chat",
        "text",
        "prompt_completion",
    ]
    assert (
        "instruction (instruction=Instruction, response=Output, input=Input)" in out
    )  # the matched columns, said
    before, after = _model(model), _model(tmp_path / "out" / "model")
    for name, path in files.items():
        ds = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 320})
        batch = data.collate(data.build(ds, StorageSpec(), tok, seed=1).train, tok.pad_token_id, packed=False)
        with torch.no_grad():
            loss_before, loss_after = float(before(**batch).loss), float(after(**batch).loss)
        assert loss_after < 0.6 * loss_before, (name, loss_before, loss_after)


@pytest.mark.slow
def test_preference_shapes_train_with_dpo_and_their_loss_falls(tmp_path: Path) -> None:
    tok = qwen25()
    model = byte_model(tmp_path / "base", tok)
    files = dpo_shapes(tmp_path)
    spec = _spec(
        tmp_path,
        model,
        files,
        objective="dpo",
        dpo={"beta": 0.1},
        **{"training.maxSteps": 30, "training.learningRate": 0.003},
    )
    code, out = run_trainer(tmp_path, spec, nproc=1, timeout=600)
    assert code == 0, out[-4000:]
    before, after = _model(model), _model(tmp_path / "out" / "model")
    for name, path in files.items():
        ds = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 320})
        pairs_ = dpo.tokenize_source_pairs(path, name, "auto", FieldMapping(), ds, tok)
        batch = dpo.collate_pairs(pairs_, tok.pad_token_id)
        with torch.no_grad():
            start = dpo.dpo_forward(before, before, batch, spec_dpo()).loss.item()
            end = dpo.dpo_forward(after, before, batch, spec_dpo())
        assert abs(start - 0.6931) < 1e-3  # the policy starts as the reference
        assert end.loss.item() < 0.5, (name, end.loss.item())
        assert (end.chosen_rewards > end.rejected_rewards).float().mean() > 0.9, name


def spec_dpo() -> Any:
    from kubetune.api.models import DpoSpec

    return DpoSpec(beta=0.1)
