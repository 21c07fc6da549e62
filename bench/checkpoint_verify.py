"""What verifying a checkpoint before it loads costs: a 0.5B-parameter checkpoint built here (a Qwen2-0.5B-
shaped config with random weights, no download; bf16 weights and a real AdamW state, saved by the trainer's
Checkpointer), checked by checkpoint.verify_dir with 1, 2 and 8 hashing threads, against reading its bytes.

    python bench/checkpoint_verify.py [--out DIR] [--json bench/results/checkpoint-verify-DATE.json]

Needs about 5 GB of RAM and 3 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def build(out: Path) -> Path:
    import torch
    from accelerate import Accelerator
    from kubetune.api.models import StorageSpec
    from kubetune_trainer import checkpoint as ckpt
    from kubetune_trainer.state import TrainState
    from kubetune_trainer.storage import OutputStore
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    acc = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = acc.prepare(model, optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the two moments exist: a full fine-tune's checkpoint
    ckpt.Checkpointer(acc, OutputStore(str(out), StorageSpec()), "bench", 1, keep=1).save(TrainState(step=1))
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B")
    return out / "checkpoints" / "step-00000001"


def measure(directory: Path) -> dict[str, float]:
    from kubetune_trainer import checkpoint as ckpt

    files = ckpt.file_table_names(directory)
    size = sum((directory / f).stat().st_size for f in files)
    started = time.perf_counter()
    for f in files:
        with open(directory / f, "rb") as handle:
            while handle.read(1 << 24):
                pass
    result = {
        "files": len(files),
        "gib": size / 2**30,
        "read_s": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],
    }
    for threads in (1, 2, 8):
        ckpt.HASH_THREADS = threads
        started = time.perf_counter()
        assert ckpt.verify_dir(directory) is None
        result[f"verify_{threads}_threads_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="where to build the checkpoint (default: a temporary directory)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kubetune-ckpt-bench-"))
    result = measure(build(out))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
