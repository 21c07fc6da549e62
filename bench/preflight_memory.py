"""The pre-flight memory estimate against measured peaks, on CPU (or one GPU when present).

    python bench/preflight_memory.py                 # all cases, each in its own process
    python bench/preflight_memory.py --out results/preflight_memory.json

Each case builds a Llama-shaped model with random weights from a config.json, prepares it
exactly as the trainer does (model.prepare_model: LoRA, chunked loss), trains 3 steps of
AdamW on random tokens, and compares the estimate (`kubetune_trainer.preflight`) with the
peak it measured: on CPU the peak resident set size above the process's size before the
model was built (ru_maxrss), on GPU torch.cuda.max_memory_allocated plus the estimate's
fixed CUDA allowance. The report prints estimate / measured per case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, int]] = {
    "llama-30M": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "vocab_size": 16000,
    },
    "llama-110M": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "vocab_size": 32000,
    },
}
SMOKE: dict[str, dict[str, int]] = {
    "llama-smoke": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
    },
}
"""--smoke: a model small enough for CI's smoke run (tests/bench/test_bench_smoke.py); its ratio means little."""


def cases(configs: dict[str, dict[str, int]]) -> list[tuple[str, str, bool]]:
    return [(c, m, ckpt) for c in configs for m in ("full", "lora") for ckpt in (False, True)]


BATCH, SEQ = 4, 256


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(config_name: str, method: str, checkpointing: bool, directory: Path) -> dict[str, Any]:
    import torch
    from kubetune.api.models import FineTuneJobSpec
    from kubetune_trainer import model as model_mod
    from kubetune_trainer import preflight

    on_gpu = torch.cuda.is_available()
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": str(directory)}, "dataset": {"train": "/x.jsonl", "maxSeqLength": SEQ}, "method": method,
        "training": {"perDeviceBatchSize": BATCH, "gradientCheckpointing": checkpointing, "precision": "bf16" if on_gpu else "fp32"},
        "distributed": {"backend": "ddp", "gpusPerNode": 1 if on_gpu else 0}, "output": {"uri": "/tmp/unused"},
    })  # fmt: skip
    trainable, total, config = preflight.parameter_counts(spec, directory)
    estimate = preflight.estimate_memory(spec, trainable, total, config, BATCH * SEQ, on_gpu, deepspeed=False)
    torch.manual_seed(0)
    base = _rss()
    device = "cuda" if on_gpu else "cpu"
    model = model_mod.prepare_model(spec, directory, on_gpu).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = config.vocab_size
    for _ in range(3):
        ids = torch.randint(0, vocab, (BATCH, SEQ), device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if on_gpu:
        measured = torch.cuda.max_memory_allocated() + preflight.CUDA_OVERHEAD
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"config": config_name, "method": method, "gradientCheckpointing": checkpointing, "device": device,
            "params": total, "trainable": trainable, "estimateBytes": estimate.total, "parts": estimate.parts,
            "measuredBytes": measured, "ratio": round(estimate.total / measured, 3)}  # fmt: skip


def make_model(name: str, root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = root / name
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(
            LlamaConfig(**{**CONFIGS, **SMOKE}[name], tie_word_embeddings=False)
        ).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--only", default="", help="run the cases whose 'config method' contains this, e.g. 'llama-30M lora'"
    )
    parser.add_argument("--smoke", action="store_true", help="only the smoke-size model (CI)")
    parser.add_argument(
        "--worker", nargs=4, metavar=("CONFIG", "METHOD", "CKPT", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        config_name, method, ckpt, directory = args.worker
        print(json.dumps(worker(config_name, method, ckpt == "1", Path(directory))))
        return
    root = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    rows = []
    for config_name, method, ckpt in cases(SMOKE if args.smoke else CONFIGS):
        if args.only not in f"{config_name} {method}":
            continue
        directory = make_model(config_name, root)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            config_name,
            method,
            "1" if ckpt else "0",
            str(directory),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{config_name:11s} {method:5s} ckpt={int(ckpt)} {row['device']}: estimate {row['estimateBytes'] / 2**20:7.0f} MiB, "
              f"measured {row['measuredBytes'] / 2**20:7.0f} MiB, estimate/measured {row['ratio']:.2f}", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
