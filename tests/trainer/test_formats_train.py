"""Every dataset format trains the quickstart model: one run mixes them all (one served by an `hf://` hub),
then each format's loss is measured before and after on the base and the trained model."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import Hub, Repo
from kubetune.api.models import DatasetSpec, StorageSpec
from kubetune_trainer import data
from trainer_helpers import SPELL, TINY_MODEL, job_spec, run_trainer


def pairs(n: int, offset: int = 0) -> list[tuple[str, str]]:
    rows = [
        json.loads(line)["messages"]
        for line in SPELL.joinpath("train.jsonl").read_text().splitlines()[offset : offset + n]
    ]
    return [(m[0]["content"], m[1]["content"]) for m in rows]


def write_formats(tmp: Path) -> dict[str, Path]:
    """The same task (spell digit words) in each format and file type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    out["chat"] = tmp / "chat.jsonl"
    out["chat"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                                   for q, a in pairs(48, 0)))  # fmt: skip
    two = pairs(48, 48)
    sharegpt = [{"conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": a1}, {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]}
                for (q1, a1), (q2, a2) in zip(two[::2], two[1::2], strict=True)]  # fmt: skip
    out["sharegpt"] = tmp / "hub" / "conversations.json"
    out["sharegpt"].parent.mkdir()
    out["sharegpt"].write_text(json.dumps(sharegpt))
    out["alpaca"] = tmp / "alpaca.csv"
    with open(out["alpaca"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerows([(q, "", a) for q, a in pairs(48, 96)])
    out["prompt_completion"] = tmp / "pc.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": q, "completion": a} for q, a in pairs(48, 144)]),
        out["prompt_completion"],
    )
    out["text"] = tmp / "text.tsv"
    out["text"].write_text("text\n" + "".join(f"{q} {a}\n" for q, a in pairs(48, 192)))
    out["preference"] = tmp / "pref.jsonl"
    out["preference"].write_text("".join(json.dumps({"prompt": q, "chosen": " " + a, "rejected": " " + " ".join(reversed(a.split()))}) + "\n"
                                         for q, a in pairs(16, 240)))  # fmt: skip
    return out


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub({}) as server:
        yield server


def format_losses(model: Any, tokenizer: Any, files: dict[str, Path]) -> dict[str, float]:
    losses = {}
    for name, path in files.items():
        spec = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 32})
        examples = data.build(spec, StorageSpec(), tokenizer, seed=1).train
        batch = data.collate(examples, tokenizer.pad_token_id, packed=False)
        with torch.no_grad():
            losses[name] = float(model(**batch, use_cache=False).loss)
    return losses


@pytest.mark.slow
def test_every_format_trains_with_a_falling_loss(tmp_path: Path, hub: Hub) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = write_formats(tmp_path)
    hub.repos["datasets/acme/spell-sharegpt"] = Repo(
        {"conversations.json": files["sharegpt"].read_bytes(), "README.md": b"# spell\n"}
    )
    sources = [{"path": "hf://datasets/acme/spell-sharegpt"}] + [
        {"path": str(p)} for name, p in files.items() if name != "sharegpt"
    ]
    spec = job_spec(
        tmp_path,
        **{"dataset": {"sources": sources, "maxSeqLength": 32, "evalSplit": 0.1}, "training.maxSteps": 40},
    )
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    code, out = run_trainer(tmp_path, spec, nproc=1, env=env)
    assert code == 0, out[-4000:]
    assert any(r.startswith("GET /datasets/acme/spell-sharegpt/resolve/") for r in hub.requests), hub.requests

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    formats = [s["format"] for s in metrics["data"]["sources"]]
    assert formats == ["chat", "chat", "instruction", "prompt_completion", "text", "preference"]
    assert (
        "data hf://datasets/acme/spell-sharegpt: chat (messages=conversations, role=from, content=value"
        in out
    )

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    before = format_losses(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)).eval(), tokenizer, files)
    after = format_losses(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model")).eval(), tokenizer, files
    )
    for name in files:
        assert after[name] < 0.85 * before[name], (
            name,
            before,
            after,
        )  # text: the question words stay unpredictable
